"""How the llama.cpp engine uses the CPU: how many threads compute, and how they wait.

llama.cpp (as llama-cpp-python builds it, with OpenMP) meets its threads at a barrier after
every operation of the graph, a few hundred times per token. OpenMP's default is to spin at a
barrier for a few milliseconds before sleeping. On an idle machine the partner arrives within
microseconds, so spinning is free; when another process holds a core, the partner is waiting
for the CPU while the spinner burns the time it needs: measured here, each compute thread
used ~190 ms of CPU per token instead of ~7 ms, and decode fell from ~150 to under 2 tok/s.
So the runner makes waiting threads sleep (OMP_WAIT_POLICY=passive) unless told otherwise.
See docs/performance.md.
"""

from __future__ import annotations

import os

from .base import EngineError

# RKLLAMA_WAIT_POLICY: "passive" (sleep at once, the default) or "active" (spin, OpenMP's own
# default). An OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user wins over both.
WAIT_POLICY_ENV = "RKLLAMA_WAIT_POLICY"
THREADS_ENV = "RKLLAMA_NUM_THREAD"
DEFAULT_WAIT_POLICY = "passive"
WAIT_POLICIES = {"passive", "active"}


def apply_wait_policy(environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """Set OpenMP's wait policy in this process; call before llama.cpp is loaded (OpenMP
    reads it once, when its library loads). Returns the policy in force, for the log."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return describe_wait_policy(environ)
    policy = (environ.get(WAIT_POLICY_ENV) or DEFAULT_WAIT_POLICY).strip().lower()
    if policy not in WAIT_POLICIES:
        raise EngineError(f"{WAIT_POLICY_ENV} must be 'passive' or 'active', got {policy!r}.")
    environ["OMP_WAIT_POLICY"] = policy
    return describe_wait_policy(environ)


def describe_wait_policy(environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    parts = [f"{key}={environ[key]}" for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if key in environ]
    return " ".join(parts) or "OpenMP default"


def default_threads() -> int:
    """The CPUs this process may run on: all cores, or those `taskset`/a cgroup leaves it
    (on an RK3588, `taskset -c 4-7 rkllama serve` gives 4, the big cores)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
