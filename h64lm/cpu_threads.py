"""CPU threads on a shared machine: short OpenMP spin-waits, and one line when the run is starved.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the PyPI wheels). Between two parallel
regions each of its threads spin-waits (GOMP_SPINCOUNT, ~300,000 iterations by default) before it
sleeps; when other processes hold the cores, a spinning thread burns the time slice that the
thread it waits for needs, and a step gets several times slower than with one thread
(experiments/bench_threads.py on a 2-core machine at load ~5: 3.8x). A short spin keeps the
quiet-machine speed of all cores and gives the cores back when busy (1.07x of one thread there).
libgomp reads its environment once, when torch starts the pool: `limit_spin_wait` must run before
`import torch` (run.py's first lines). This module imports nothing heavy for that reason.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

__all__ = ["SPINCOUNT", "limit_spin_wait", "starvation_note"]

SPINCOUNT = "10000"  # spin iterations before an idle OpenMP thread sleeps (libgomp's default: 300000)


def limit_spin_wait(environ: MutableMapping[str, str] = os.environ) -> None:
    """Shorten OpenMP's spin-wait unless the user chose a wait policy or spin count."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPINCOUNT


def starvation_note(threads: int, load: Optional[float] = None, cpus: Optional[int] = None) -> Optional[str]:
    """One line when the other processes' load leaves this run's `threads` fewer cores than it
    uses (the 1-minute load average, taken before the run starts working), else None."""
    load = os.getloadavg()[0] if load is None else load
    cpus = os.cpu_count() or 1 if cpus is None else cpus
    if threads <= 1 or load + threads <= cpus + 0.5:
        return None
    return (f"note: load average {load:.1f} on {cpus} CPU(s) before this run starts: its {threads} threads "
            f"share the cores with other processes; if steps are slow, hardware.num_threads=1 is often "
            f"faster on a busy machine")
