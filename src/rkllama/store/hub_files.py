"""What the Hugging Face hub (HF_ENDPOINT) says about a file, and its failures explained in
messages a person can act on."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers

from .inside import describe_os_error
from .pull_ref import PullError, PullRef


@dataclass
class RemoteFile:
    filename: str
    url: str  # where to GET the bytes (the hub's redirect target for LFS files)
    size: int
    etag: str  # sha256 for LFS files, the git blob sha1 otherwise
    headers: dict[str, str] = field(default_factory=dict)


def _endpoint() -> str:
    return constants.ENDPOINT


def explain(exc: BaseException, ref: PullRef, root: Path | None = None) -> str:
    """A message a person can act on, for any failure of a hub request."""
    endpoint = _endpoint()
    if isinstance(exc, GatedRepoError):
        return (
            f"{ref.repo_id} is a gated repository: accept its terms at {endpoint}/{ref.repo_id} and set HF_TOKEN "
            "(in the server's environment) to a token of that account."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"Repository {ref.repo_id} not found on {endpoint}. Check the name; if the repository is private, "
            "set HF_TOKEN (in the server's environment) to a token that can read it."
        )
    if isinstance(exc, RevisionNotFoundError | RemoteEntryNotFoundError):
        return (
            f"File {ref.filename} not found in {ref.repo_id}. Check the file name "
            f"(the repository's files are listed at {endpoint}/{ref.repo_id}/tree/main)."
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return f"Access to {ref.repo_id} was refused ({status}): set HF_TOKEN to a token that can read it."
        return f"{endpoint} answered {status} for {ref.repo_id}/{ref.filename}; retry later."
    if isinstance(exc, OfflineModeIsEnabled):
        return "Hugging Face offline mode is on (HF_HUB_OFFLINE): unset it to pull models."
    if isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        return f"Cannot reach {endpoint} ({type(exc).__name__}: {exc}). Check the network connection or HF_ENDPOINT."
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "The disk is full: free some space (e.g. rkllama rm <model>) and pull again."
    if isinstance(exc, OSError):
        return f"Cannot write the download into the models directory ({describe_os_error(exc, root)})."
    return f"{type(exc).__name__}: {exc}"


def fetch_metadata(ref: PullRef, filename: str | None = None) -> RemoteFile:
    """HEAD the file on the hub (HF_ENDPOINT and HF_TOKEN are honoured by huggingface_hub)."""
    name = filename or ref.filename
    url = hf_hub_url(ref.repo_id, name)
    try:
        meta = get_hf_file_metadata(url)
    except Exception as exc:  # every hub failure becomes a message a person can act on
        raise PullError(explain(exc, PullRef(ref.repo_id, name))) from None
    if meta.etag is None or meta.size is None:
        raise PullError(f"{_endpoint()} sent no ETag or size for {name}: is HF_ENDPOINT a Hugging Face hub?")
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        # Like huggingface_hub: the token never goes to the CDN.
        headers.pop("authorization", None)
    return RemoteFile(filename=name, url=meta.location, size=meta.size, etag=meta.etag, headers=headers)
