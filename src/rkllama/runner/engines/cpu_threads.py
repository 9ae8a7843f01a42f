"""How the llama.cpp engine uses the CPU: how many threads compute, and how they wait.

llama.cpp (as llama-cpp-python builds it, with OpenMP) meets its threads at a barrier after
every operation of the graph, a few hundred times per token. OpenMP's default is to spin at a
barrier for a few milliseconds before sleeping. On an idle machine the partner arrives within
microseconds, so spinning is free; when another process holds a core, the partner is waiting
for the CPU while the spinner burns the time it needs: measured here, each compute thread
used ~190 ms of CPU per token instead of ~7 ms, and decode fell from ~150 to under 2 tok/s.
Sleeping at once (OMP_WAIT_POLICY=passive) survives that but costs a wake-up per barrier:
on a quiet machine decode fell to 0.38x llama-server. So by default the runner lets a waiting
thread spin only briefly (GOMP_SPINCOUNT=300) and then sleep: measured on a quiet 2-core VM,
121 tok/s (llama-server 117-130) and, with one busy process, 46 tok/s (llama-server 33-40).
See docs/performance.md and bench/RESULTS.md.
"""

from __future__ import annotations

import os

from .base import EngineError

# RKLLAMA_WAIT_POLICY: "brief" (spin ~300 rounds, then sleep: the default), "passive" (sleep at
# once) or "active" (spin without end, also while idle). The user's own OMP_WAIT_POLICY or
# GOMP_SPINCOUNT wins over all three.
WAIT_POLICY_ENV = "RKLLAMA_WAIT_POLICY"
THREADS_ENV = "RKLLAMA_NUM_THREAD"
DEFAULT_WAIT_POLICY = "brief"
WAIT_POLICIES = {"brief", "passive", "active"}
BRIEF_SPIN_COUNT = "300"


def apply_wait_policy(environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """Set OpenMP's wait policy in this process; call before llama.cpp is loaded (OpenMP
    reads it once, when its library loads). Returns the policy in force, for the log."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return describe_wait_policy(environ)
    policy = (environ.get(WAIT_POLICY_ENV) or DEFAULT_WAIT_POLICY).strip().lower()
    if policy not in WAIT_POLICIES:
        raise EngineError(f"{WAIT_POLICY_ENV} must be 'brief', 'passive' or 'active', got {policy!r}.")
    if policy == "brief":
        environ["GOMP_SPINCOUNT"] = BRIEF_SPIN_COUNT
    else:
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
