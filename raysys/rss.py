"""Peak resident memory of this process *and its children* (Ray workers, pool processes).

`resource.getrusage` reports only one process's peak; a Ray pipeline's memory lives in worker
processes, so benches sample the whole process tree in a background thread instead.
"""

from __future__ import annotations

import threading

import psutil


def tree_rss(pid: int | None = None) -> int:
    """Current RSS in bytes of a process plus all its descendants."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """`with PeakRSS() as m: ...; m.peak_mb` — sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.2, pid: int | None = None):
        self.interval, self.pid, self.peak = interval, pid, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = tree_rss(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)
