"""The runner subprocess: loads one model and serves requests from the server.

A reader thread takes messages off the socket so that a `cancel` reaches the running
request at once. Requests run one at a time on the main thread, or, when the engine can run
several at once (`info.parallel` > 1, llama.cpp's batched decoding), each in its own thread.

The runner never outlives its server: when the socket closes (the server exited or was
killed) every request is cancelled at its next token and the runner exits; on Linux the
kernel also kills it when the server process dies (PR_SET_PDEATHSIG). A heartbeat thread
tells the server the process is alive while a long prompt evaluation sends no tokens, so
the server's watchdog only fires on a runner that is really stuck (stopped, deadlocked).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ..types import EmbedRequest, GenerateRequest, TokenEvent
from .engines.base import Engine, EngineError, LoadSpec
from .engines.cpu_threads import apply_wait_policy, batch_decoding
from .engines.factory import create_engine
from .protocol import decode, encode

log = logging.getLogger("rkllama.runner")


# Tokens that come closer together than this are sent to the server in one message.
STREAM_BATCH_SECONDS = float(os.environ.get("RKLLAMA_STREAM_BATCH_MS", "40")) / 1000


class Connection:
    """The runner's end of the socket.

    Every message wakes the server process, and on a small board (or in a VM) a wake-up costs
    more than the work it brings: one per token took 5% off decode speed here (see
    bench/RESULTS.md). So tokens that follow each other within STREAM_BATCH_SECONDS are
    held and sent together by a flusher thread, while a token after a quiet spell (a slow
    model) and every final message go out at once.
    """

    def __init__(self, sock: socket.socket, batch_seconds: float = STREAM_BATCH_SECONDS) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._batch_seconds = batch_seconds
        self._lock = threading.Condition()
        self._held: list[dict[str, Any]] = []
        self._last_write = 0.0
        self.lost = False  # the server end is gone: nothing more can be sent
        self.on_lost: Callable[[], None] = lambda: None
        if batch_seconds > 0:
            threading.Thread(target=self._flush_loop, daemon=True).start()

    def _sendall(self, data: bytes) -> None:
        """Caller holds the lock. A write to a server that is gone is dropped, once noticed."""
        if self.lost:
            return
        try:
            self._sock.sendall(data)
        except OSError:
            self.lost = True
            self.on_lost()

    def _write(self, messages: list[dict[str, Any]]) -> None:
        """Caller holds the lock. Held tokens of one request travel as one token message, also
        when several requests' tokens interleave; each request's own order is kept."""
        merged: list[dict[str, Any]] = []
        open_tokens: dict[Any, dict[str, Any]] = {}  # request id -> its token message in `merged`
        for message in messages:
            request_id = message.get("id")
            if message.get("type") == "token" and request_id in open_tokens:
                open_tokens[request_id]["text"] += message["text"]
                open_tokens[request_id]["tokens"] = open_tokens[request_id].get("tokens", 1) + message.get("tokens", 1)
                continue
            merged.append(dict(message))
            if message.get("type") == "token":
                open_tokens[request_id] = merged[-1]
            else:
                open_tokens.pop(request_id, None)
        self._sendall(b"".join(encode(m) for m in merged))
        self._last_write = time.monotonic()

    def send(self, message: dict[str, Any]) -> None:
        """Send now, after whatever tokens are held (so order is kept)."""
        with self._lock:
            self._write([*self._held, message])
            self._held.clear()

    def send_token(self, message: dict[str, Any]) -> None:
        with self._lock:
            quiet = time.monotonic() - self._last_write >= self._batch_seconds
            if not self._held and quiet:
                self._write([message])
                return
            self._held.append(message)
            if len(self._held) == 1:
                self._lock.notify()

    def _flush_loop(self) -> None:
        with self._lock:
            while True:
                if not self._held:
                    self._lock.wait()
                    continue
                remaining = self._last_write + self._batch_seconds - time.monotonic()
                if remaining > 0:
                    self._lock.wait(remaining)
                    continue
                self._write(self._held)
                self._held.clear()

    def receive(self) -> dict[str, Any] | None:
        try:
            line = self._reader.readline()
        except OSError:
            line = b""
        return decode(line) if line else None

    def beat(self, interval: float) -> None:
        """Send a heartbeat every `interval` seconds until the server is gone (a daemon thread)."""
        while not self.lost:
            time.sleep(interval)
            with self._lock:
                self._write([*self._held, {"op": "heartbeat"}])
                self._held.clear()


def _serve_one(engine: Engine, message: dict[str, Any], cancel: threading.Event, conn: Connection) -> None:
    request_id = message["id"]
    op = message["op"]
    try:
        if op == "generate":
            request = GenerateRequest.from_dict(message["request"])
            for event in engine.generate(request, cancel):
                if isinstance(event, TokenEvent):
                    conn.send_token({"id": request_id, "type": "token", "text": event.text, "tokens": event.tokens})
                else:
                    conn.send({"id": request_id, **asdict(event)})
        elif op == "embed":
            result = engine.embed(EmbedRequest(**message["request"]))
            # One message per vector: thousands of inputs would not fit in one line.
            for index, vector in enumerate(result.embeddings):
                conn.send({"id": request_id, "type": "embedding", "index": index, "vector": vector})
            conn.send({"id": request_id, "type": "result", "value": {**asdict(result), "embeddings": []}})
        elif op == "tokenize":
            conn.send({"id": request_id, "type": "result", "value": engine.tokenize(message["text"])})
        else:
            conn.send({"id": request_id, "type": "error", "message": f"Unknown operation {op!r}."})
    except EngineError as exc:
        conn.send({"id": request_id, "type": "error", "message": str(exc), "client_error": exc.client_error})
    except Exception as exc:  # the runner must answer, whatever the engine did
        traceback.print_exc()
        conn.send({"id": request_id, "type": "error", "message": f"{type(exc).__name__}: {exc}"})


def serve(conn: Connection) -> int:
    first = conn.receive()
    if first is None or first.get("op") != "load":
        return 2
    try:
        # Before the engine loads llama.cpp: OpenMP reads its wait policy once, at load.
        spec = LoadSpec(**first["spec"])
        wait_policy = apply_wait_policy(batch_decoding(spec))
        engine = create_engine(spec)
    except Exception as exc:
        message = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
        conn.send({"op": "load_error", "message": message})
        return 1
    log.info("%s engine: %d threads, %s", engine.info.engine, engine.info.threads, wait_policy)
    conn.send({"op": "ready", "info": asdict(engine.info)})
    if heartbeat := first.get("heartbeat_seconds"):
        threading.Thread(target=conn.beat, args=(float(heartbeat),), daemon=True).start()

    work: queue.Queue[dict[str, Any] | None] = queue.Queue()
    cancels: dict[int, threading.Event] = {}
    cancels_lock = threading.Lock()

    stopping = threading.Event()  # no new work: requests still queued are cancelled at once

    def cancel_all() -> None:
        with cancels_lock:
            stopping.set()
            for event in cancels.values():
                event.set()

    # A server that went away cannot read answers: stop at the next token, not at the end.
    conn.on_lost = cancel_all

    def read_loop() -> None:
        while (message := conn.receive()) is not None:
            if message.get("op") == "cancel":
                with cancels_lock:
                    cancels.setdefault(message["id"], threading.Event()).set()
            elif message.get("op") == "shutdown":
                break  # unloading: stop the requests in flight instead of finishing them
            else:
                work.put(message)
        cancel_all()  # asked to stop, or the server is gone (EOF)
        work.put(None)

    def serve_and_forget(message: dict[str, Any], cancel: threading.Event) -> None:
        _serve_one(engine, message, cancel, conn)
        with cancels_lock:
            cancels.pop(message["id"], None)

    threading.Thread(target=read_loop, daemon=True).start()
    running: list[threading.Thread] = []
    while (message := work.get()) is not None:
        with cancels_lock:
            cancel = cancels.setdefault(message["id"], threading.Event())
            if stopping.is_set():
                cancel.set()
        if engine.info.parallel <= 1:
            serve_and_forget(message, cancel)
            continue
        # The server sends at most `parallel` requests at a time; the engine batches them.
        running = [thread for thread in running if thread.is_alive()]
        thread = threading.Thread(target=serve_and_forget, args=(message, cancel), daemon=True)
        thread.start()
        running.append(thread)
    for thread in running:
        thread.join()
    engine.close()
    return 0


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to kill this process when the server dies, even by SIGKILL; the socket's EOF
    is the portable path, this one also stops a runner stuck in native code."""
    libc_name = ctypes.util.find_library("c")
    if sys.platform != "linux" or libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    elif parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the server died before the request to the kernel was made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RKLLama model runner (started by the server).")
    parser.add_argument("fd", type=int, help="socket file descriptor inherited from the server")
    parser.add_argument("--parent", type=int, help="the server's pid: the runner dies with it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RKLLAMA_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr)
    die_with_parent(args.parent)
    sock = socket.socket(fileno=args.fd)
    return serve(Connection(sock))


if __name__ == "__main__":
    sys.exit(main())
