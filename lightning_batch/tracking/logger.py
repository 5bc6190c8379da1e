"""``BufferedMLFlowLogger``: Lightning's ``MLFlowLogger`` that writes metrics in batches, off the training thread.

A sqlite write is a commit (an fsync), and a small step is cheaper than that, so metrics are
buffered and written with ``log_batch`` up to 1000 at a time by one writer thread, and kept in
memory for the run's plots. Even batched, MLflow's SQL store spends Python time on every value,
which is why per-step metrics are logged every ``log_every`` steps rather than every step
(``benchmarks/overhead.py`` measures what logging every step costs).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_batch._extras import check
from lightning_batch.tracking.store import _FEATURE

#: Metric values per ``log_batch`` call; MLflow accepts up to 1000 per request.
FLUSH_EVERY = 1000


#: Also write what is buffered at least this often, so the UI follows a long run.
FLUSH_SECONDS = 10.0


class BufferedMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that batches metric writes, writes them off the training thread, and
    remembers every value for plots.

    Values are handed to a writer thread with ``log_batch`` when :data:`FLUSH_EVERY` are waiting or
    :data:`FLUSH_SECONDS` have passed, so a step costs a dict append: a sqlite commit is an fsync,
    which in the training thread was a sizeable share of a small tabular step
    (``benchmarks/overhead.py``). One writer keeps the batches in order. :meth:`flush` (at
    :meth:`save`, i.e. with every checkpoint, and at :meth:`finalize`) waits until everything
    handed over is written and raises what a write raised, so nothing logged is lost silently.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check("mlflow", "tracking", _FEATURE)  # Lightning's own message would not name the extra
        super().__init__(*args, **kwargs)
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self._last_flush = time.monotonic()
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future[None]] = []
        #: name -> [(step, value)], everything logged by this process.
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        step = step or 0
        for key, value in metrics.items():
            value = float(value)
            self.history[key].append((step, value))
            self._pending.append((key, value, timestamp, step))
        if len(self._pending) >= FLUSH_EVERY or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the buffered values to the writer thread (without waiting for the write)."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        from mlflow.entities import Metric

        pending, self._pending = self._pending, []
        rows = [Metric(key=k, value=v, timestamp=t, step=s) for k, v, t, s in pending]
        experiment, run_id = self.experiment, self.run_id  # resolved here, in the training thread
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")

        def write() -> None:
            for start in range(0, len(rows), FLUSH_EVERY):
                experiment.log_batch(run_id=run_id, metrics=rows[start : start + FLUSH_EVERY])

        self._writes = [w for w in self._writes if not w.done() or w.exception() is not None]
        self._writes.append(self._writer.submit(write))

    @rank_zero_only
    def flush(self) -> None:
        """Write every buffered metric now, and wait until everything handed over is written."""
        self._hand_over()
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()  # re-raises a failed write here, in the training thread

    @rank_zero_only
    def set_tag(self, key: str, value: str) -> None:
        """Tag the run now (for rare events, like a gradient-health warning, not per step)."""
        self.experiment.set_tag(self.run_id, key, value[:5000])

    @rank_zero_only
    def save(self) -> None:
        super().save()
        self.flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized and not self._pending:
            return  # nothing was logged: no run to create (Lightning's own rule)
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
        super().finalize(status)

    def last(self, key: str) -> float | None:
        """The last value logged for ``key`` in this process, if any."""
        values = self.history.get(key)
        return values[-1][1] if values else None
