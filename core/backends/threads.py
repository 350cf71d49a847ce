"""How many compute threads a model version gets when the config says 0 ("auto").

The rule: all concurrent runs of one model version together use each *physical*
core once, i.e. ``physical cores // concurrent runs`` threads per run (at least 1).

- Physical, not logical: SMT siblings share one core's vector units, and the GEMM
  and convolution kernels ONNX Runtime (MLAS) and XNNPACK use saturate those, so a
  second thread per core adds contention, not speed. ONNX Runtime's own default
  counts physical cores for the same reason.
- Divided by the runs at once (``batching.instances``, or ``onnx.sessions`` /
  ``litert.interpreters``): two batches in flight with a full-width pool each would
  ask for twice the cores and time-slice, which hurts tail latency most.
- On the 2–8 core store PCs this targets that gives 2–8 threads for one instance
  (the default), 1–4 for two. The event loop needs little CPU (the model's compute
  runs outside it) and ONNX Runtime's threads do not spin between runs by default
  (``allow_spinning: false``), so an idle model leaves the cores to the store's apps.
- Several models busy at the same moment can oversubscribe; on a box where that is
  the normal case, set the thread counts by hand.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

_SYSFS_CPU = Path("/sys/devices/system/cpu")


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@functools.cache
def physical_cores() -> int:
    """Cores this process may run on, SMT siblings counted once (Linux); else logical CPUs."""
    cpus = _usable_cpus()
    cores: set[str] = set()
    for cpu in cpus:
        try:
            siblings = (_SYSFS_CPU / f"cpu{cpu}/topology/thread_siblings_list").read_text()
        except OSError:
            return max(1, len(cpus))  # no topology (container without sysfs, macOS...)
        cores.add(siblings.strip())
    return max(1, len(cores))


def auto_threads(concurrent_runs: int) -> int:
    return max(1, physical_cores() // max(1, concurrent_runs))


__all__ = ["auto_threads", "physical_cores"]
