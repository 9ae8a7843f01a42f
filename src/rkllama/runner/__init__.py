"""One subprocess per loaded model: a crash in native code never takes the server down,
and unloading a model really frees its memory."""
