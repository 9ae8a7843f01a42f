"""How the llama.cpp engine uses the CPU: how many threads compute, and how they wait.

llama.cpp (as llama-cpp-python builds it, with OpenMP) meets its threads at a barrier after
every operation of the graph, a few hundred times per token. OpenMP's default is to spin at a
barrier for a few milliseconds before sleeping. On an idle machine the partner arrives within
microseconds, so spinning is free; when another process holds a core, the partner is waiting
for the CPU while the spinner burns the time it needs: measured here, each compute thread
used ~190 ms of CPU per token instead of ~7 ms, and decode fell from ~150 to under 2 tok/s.
Sleeping at once (OMP_WAIT_POLICY=passive) survives that but costs a wake-up per barrier:
on a quiet machine decode fell to 0.38x llama-server. The brief wait (GOMP_SPINCOUNT=300: spin
a little, then sleep) measured 121 tok/s on a quiet 2-core VM (llama-server 117-130) and, with
one busy process, 46 tok/s (llama-server 33-40). On a VM whose idle cores wake slowly the brief
wait cost much more (16-55 tok/s against 88 with spinning, 2026-12-06). So the default, `auto`,
lets the batch decoder's threads spin (GOMP_SPINCOUNT=300000, libgomp's own default, as
llama-server runs) and relies on its step-thread choice (llamacpp_threads) to drop to one
thread, which has no barriers, beside a busy neighbour: measured 0.95x llama-server quiet,
1.44x beside one busy process and 1.31x beside two (2026-12-07 00:18). A one-at-a-time runner
(NUM_PARALLEL=1, llama-cpp-python's own loop, no step-thread choice) keeps the brief wait. See
docs/performance.md and bench/RESULTS.md.
"""

from __future__ import annotations

import os

from ...context_size import DEFAULT_PARALLEL
from .base import EngineError, LoadSpec

# RKLLAMA_WAIT_POLICY: "auto" (the default: "spin" for the batch decoder, else "brief"), "brief"
# (spin ~300 rounds, then sleep), "spin" (spin 300000 rounds, then sleep), "passive" (sleep at
# once) or "active" (spin without end, also while idle). The user's own OMP_WAIT_POLICY or
# GOMP_SPINCOUNT wins over all of them.
WAIT_POLICY_ENV = "RKLLAMA_WAIT_POLICY"
THREADS_ENV = "RKLLAMA_NUM_THREAD"
DEFAULT_WAIT_POLICY = "auto"
WAIT_POLICIES = {"auto", "brief", "spin", "passive", "active"}
SPIN_COUNTS = {"brief": "300", "spin": "300000"}


def apply_wait_policy(batched: bool, environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """Set OpenMP's wait policy in this process; call before llama.cpp is loaded (OpenMP
    reads it once, when its library loads). `batched`: the runner will use the batch decoder,
    whose step-thread choice makes spinning safe. Returns the policy in force, for the log."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return describe_wait_policy(environ)
    policy = (environ.get(WAIT_POLICY_ENV) or DEFAULT_WAIT_POLICY).strip().lower()
    if policy not in WAIT_POLICIES:
        names = ", ".join(f"'{name}'" for name in sorted(WAIT_POLICIES))
        raise EngineError(f"{WAIT_POLICY_ENV} must be one of {names}, got {policy!r}.")
    if policy == "auto":
        policy = "spin" if batched else "brief"
    if policy in SPIN_COUNTS:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNTS[policy]
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


def parallel_setting(spec: LoadSpec) -> int:
    """NUM_PARALLEL of a llama.cpp model: the load's num_parallel, else the Modelfile's, else
    RKLLAMA_NUM_PARALLEL, else the default (EngineError if it is not an integer)."""
    value = (
        spec.overrides.get("num_parallel")
        or spec.modelfile.get("NUM_PARALLEL")
        or os.environ.get("RKLLAMA_NUM_PARALLEL")
        or DEFAULT_PARALLEL
    )
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EngineError(f"NUM_PARALLEL must be an integer, got {value!r}.") from None


def batch_decoding(spec: LoadSpec) -> bool:
    """Whether a runner for `spec` will use the batch decoder (a GGUF with NUM_PARALLEL > 1),
    read before llama.cpp loads; a bad value is refused by the engine itself."""
    try:
        return spec.format == "gguf" and parallel_setting(spec) > 1
    except EngineError:
        return False
