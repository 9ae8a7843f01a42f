"""Server side of a runner: starts the subprocess and talks to it over a socket pair.

A runner runs up to `info.parallel` requests at once (llama.cpp batches them); more wait
for a permit in arrival order. One reader task routes the runner's messages to each request's
queue by id. If the process dies, every request in flight gets a `RunnerError` and `on_exit`
tells the scheduler, which forgets the model so the next load starts a fresh runner.

Two faults end a runner that is still running, so that it is forgotten for real: a message
that breaks the protocol (too long, not JSON), and the watchdog, which kills a busy runner
that sent nothing, not even its heartbeat, for `limits.timeout` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from ..errors import BadRequest, ModelLoadError, ModelUnloading, RkllamaError, RunnerError, RunnerTimeout
from ..types import DoneEvent, EmbedRequest, EmbedResult, GenerateRequest, ModelInfo, TokenEvent, Usage
from .engines.base import LoadSpec
from .protocol import RUNNER_MODULE, decode, encode

log = logging.getLogger(__name__)

# How long a cancelled request may take to stop before the runner is killed.
CANCEL_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class RunnerLimits:
    # A busy runner silent for this long is killed (0: never). It beats every timeout/5 s.
    timeout: float = 60.0
    # The longest line a runner may send. Tokens are small and embeddings travel one vector
    # per line, so only a broken runner comes near it.
    max_message_bytes: int = 2**24

    @property
    def heartbeat_seconds(self) -> float | None:
        return max(0.05, min(5.0, self.timeout / 5)) if self.timeout > 0 else None


def _request_error(message: dict[str, Any]) -> BadRequest | RunnerError:
    text = message.get("message") or "The runner failed."
    return BadRequest(text) if message.get("client_error") else RunnerError(text)


class RunnerProcess:
    def __init__(
        self,
        spec: LoadSpec,
        on_exit: Callable[[RunnerProcess], None] | None = None,
        limits: RunnerLimits | None = None,
    ) -> None:
        self.spec = spec
        self.limits = limits or RunnerLimits()
        self.info: ModelInfo | None = None
        self._on_exit = on_exit
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._permits = asyncio.Semaphore(1)  # resized to info.parallel once loaded
        self._inboxes: dict[int, asyncio.Queue[dict[str, Any] | RkllamaError]] = {}
        self._dead: RunnerError | None = None
        self._fault: RunnerError | None = None  # why we killed it, when we did
        self._interrupted: RkllamaError | None = None  # why requests are being cancelled (shutdown)
        self._ids = itertools.count(1)
        self._closing = False
        self._draining = False
        self._idle = asyncio.Event()  # set while pending == 0
        self._idle.set()
        self._last_heard = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []  # referenced, so they are not collected
        self.pending = 0  # requests queued or running, for `ps` and scheduling

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self, timeout: float = 300.0) -> ModelInfo:
        parent_sock, child_sock = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                RUNNER_MODULE,
                str(child_sock.fileno()),
                "--parent",
                str(os.getpid()),
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                # Native libraries print to stdout; keep the server's stdout clean.
                stdout=sys.stderr.fileno(),
                start_new_session=True,
            )
        finally:
            child_sock.close()
        self._reader, self._writer = await asyncio.open_connection(
            sock=parent_sock, limit=self.limits.max_message_bytes
        )
        await self._send({"op": "load", "spec": asdict(self.spec), "heartbeat_seconds": self.limits.heartbeat_seconds})
        try:
            reply = await asyncio.wait_for(self._receive(), timeout)
        except (TimeoutError, RunnerError) as exc:
            await self.close()
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else self._exit_reason()
            raise ModelLoadError(f"Failed to load model {self.spec.name}: the runner {reason}.") from None
        if reply.get("op") != "ready":
            await self.close()
            raise ModelLoadError(f"Failed to load model {self.spec.name}: {reply.get('message')}")
        self.info = ModelInfo(**reply["info"])
        self._permits = asyncio.Semaphore(max(1, self.info.parallel))
        loop = asyncio.get_running_loop()
        self._last_heard = time.monotonic()
        self._tasks = [loop.create_task(self._route()), loop.create_task(self._watch())]
        if self.limits.timeout > 0:
            self._tasks.append(loop.create_task(self._watchdog()))
        return self.info

    async def _route(self) -> None:
        """Hand each message to the request it belongs to; on EOF, fail them all."""
        try:
            while True:
                message = await self._receive()
                self._last_heard = time.monotonic()
                inbox = self._inboxes.get(message.get("id"))  # type: ignore[arg-type]
                if inbox is not None:  # else: a heartbeat, or leftovers of a request that gave up
                    inbox.put_nowait(message)
        except RunnerError as exc:
            self._dead = self._fault or exc
            for inbox in self._inboxes.values():
                inbox.put_nowait(self._dead)

    async def _watchdog(self) -> None:
        """Kill a busy runner that has sent nothing for `limits.timeout` seconds: stopped,
        deadlocked or stuck in native code. Its requests get a 504; the model is forgotten."""
        timeout = self.limits.timeout
        while self.alive:
            await asyncio.sleep(min(1.0, timeout / 4))
            silent = time.monotonic() - self._last_heard
            if self._inboxes and silent > timeout and self.alive:
                log.error("Runner of %s sent nothing for %.0f s while busy; killing it", self.spec.name, silent)
                self._fault = RunnerTimeout(
                    f"The runner of model {self.spec.name} made no progress for {timeout:g} s "
                    "(RKLLAMA_RUNNER_TIMEOUT) and was stopped. The model has been unloaded; "
                    "load it again to continue."
                )
                await self.kill()
                return

    async def _protocol_error(self, what: str) -> RunnerError:
        """The runner broke the protocol: end it for real, so the model is not kept half-alive."""
        log.error("Runner of %s %s; killing it", self.spec.name, what)
        self._fault = RunnerError(
            f"The runner of model {self.spec.name} {what} and was stopped. "
            "The model has been unloaded; load it again to continue."
        )
        await self.kill()
        return self._fault

    async def _watch(self) -> None:
        assert self._process is not None
        await self._process.wait()
        if not self._closing:
            log.error("Runner for %s %s", self.spec.name, self._exit_reason())
        if self._on_exit:
            self._on_exit(self)

    def _exit_reason(self) -> str:
        if self._fault is not None:
            return "was stopped by the server"
        code = self._process.returncode if self._process else None
        if code is None:
            return "stopped answering"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._writer is not None
        try:
            self._writer.write(encode(message))
            await self._writer.drain()
        except (ConnectionError, OSError):
            raise RunnerError(self._died_message()) from None

    async def _receive(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except (ConnectionError, OSError):
            line = b""
        except ValueError:  # asyncio's LimitOverrunError: the line is longer than the limit
            limit = self.limits.max_message_bytes
            raise await self._protocol_error(f"sent a message longer than {limit} bytes") from None
        if not line:
            if self._process is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._process.wait(), 2.0)
            raise self._fault or RunnerError(self._died_message())
        try:
            message = decode(line)
        except ValueError:
            raise await self._protocol_error("sent a message that is not JSON") from None
        if not isinstance(message, dict):
            raise await self._protocol_error("sent a message that is not a JSON object")
        return message

    def _died_message(self) -> str:
        return (
            f"The runner of model {self.spec.name} {self._exit_reason()} during the request. "
            "The model has been unloaded; load it again to continue."
        )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[tuple[int, asyncio.Queue[dict[str, Any] | RkllamaError]]]:
        """A permit to run one request, its id and the queue its messages arrive in."""
        if self._draining:
            raise ModelUnloading(f"Model {self.spec.name} is being unloaded; send the request again to load it again.")
        self.pending += 1
        self._idle.clear()
        try:
            async with self._permits:
                if self._dead is not None:
                    raise self._dead
                if self._interrupted is not None:
                    raise self._interrupted
                request_id = next(self._ids)
                inbox: asyncio.Queue[dict[str, Any] | RkllamaError] = asyncio.Queue()
                self._inboxes[request_id] = inbox
                try:
                    yield request_id, inbox
                finally:
                    del self._inboxes[request_id]
        finally:
            self.pending -= 1
            if self.pending == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request is queued or running (at once when none is)."""
        await self._idle.wait()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | DoneEvent]:
        """Stream a completion. Closing the iterator early cancels the request in the runner."""
        async with self._slot() as (request_id, inbox):
            await self._send({"op": "generate", "id": request_id, "request": request.to_dict()})
            finished = False
            try:
                while True:
                    message = await self._next(inbox)
                    kind = message.get("type")
                    if kind == "token":
                        yield TokenEvent(text=message["text"], tokens=int(message.get("tokens", 1)))
                    elif kind == "done":
                        finished = True
                        if message["finish_reason"] == "cancelled":
                            # Only an unload or a shutdown cancels without us asking (see _cancel).
                            raise self._interrupted or RunnerError(
                                f"Model {self.spec.name} was unloaded while answering this request."
                            )
                        yield DoneEvent(finish_reason=message["finish_reason"], usage=Usage(**message["usage"]))
                        return
                    else:
                        finished = True
                        raise _request_error(message)
            finally:
                if not finished and self.alive and self._interrupted is None:
                    # The client went away (or the task was cancelled): stop the runner's
                    # work. Shielded, since awaits in a cancelled scope would be cancelled too.
                    # (An interrupt has sent the cancel already and does not wait for it.)
                    with anyio.CancelScope(shield=True):
                        await self._cancel(request_id, inbox)

    @staticmethod
    async def _next(inbox: asyncio.Queue[dict[str, Any] | RkllamaError]) -> dict[str, Any]:
        """The request's next message; the runner's death once it has died."""
        message = await inbox.get()
        if isinstance(message, RkllamaError):
            inbox.put_nowait(message)  # whoever reads next hears it too
            raise message
        return message

    async def _cancel(self, request_id: int, inbox: asyncio.Queue[dict[str, Any] | RkllamaError]) -> None:
        """Stop the request and wait for its end, so that its permit is free only once the runner is."""
        try:
            await self._send({"op": "cancel", "id": request_id})
            async with asyncio.timeout(CANCEL_GRACE_SECONDS):
                while (message := await self._next(inbox)).get("type") == "token":
                    pass
            if message.get("type") == "done":
                log.info(
                    "Request %d on %s cancelled; the runner stopped after %d tokens",
                    request_id,
                    self.spec.name,
                    message["usage"]["completion_tokens"],
                )
        except (RkllamaError, TimeoutError):
            log.warning("Runner of %s did not stop after cancel; killing it", self.spec.name)
            await self.kill()

    async def _call(self, op: str, **fields: Any) -> Any:
        async with self._slot() as (request_id, inbox):
            await self._send({"op": op, "id": request_id, **fields})
            message = await self._next(inbox)
            if message.get("type") != "result":
                raise _request_error(message)
            return message["value"]

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """The runner sends one message per vector, then the result with the token count."""
        async with self._slot() as (request_id, inbox):
            await self._send({"op": "embed", "id": request_id, "request": asdict(request)})
            vectors: list[list[float]] = []
            while (message := await self._next(inbox)).get("type") == "embedding":
                vectors.append(message["vector"])
            if message.get("type") != "result":
                raise _request_error(message)
            return EmbedResult(**{**message["value"], "embeddings": vectors})

    async def drain(self, grace: float) -> bool:
        """Refuse new requests and wait up to `grace` seconds for those in flight to finish.
        True when they all did."""
        self._draining = True
        try:
            async with asyncio.timeout(max(0.0, grace)):
                await self._idle.wait()
            return True
        except TimeoutError:
            return self.pending == 0

    async def interrupt(self, reason: RkllamaError) -> None:
        """End every request with `reason` now (the server is shutting down), without
        waiting for the runner, which may be slow or stuck: it is told to cancel them, and
        requests still waiting for a permit get `reason` as soon as they have one."""
        self._interrupted = reason
        for request_id, inbox in list(self._inboxes.items()):
            inbox.put_nowait(reason)
            with contextlib.suppress(RunnerError):
                await self._send({"op": "cancel", "id": request_id})

    async def tokenize(self, text: str) -> list[int]:
        return await self._call("tokenize", text=text)

    async def kill(self) -> None:
        if self.alive:
            assert self._process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            await self._process.wait()

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the runner to exit, and kill it if it does not: its memory is then freed."""
        self._closing = True
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.write(encode({"op": "shutdown"}))
                await self._writer.drain()
        if self._process is not None and self.alive:
            try:
                await asyncio.wait_for(self._process.wait(), timeout)
            except TimeoutError:
                await self.kill()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
