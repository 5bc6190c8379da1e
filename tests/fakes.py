"""Test doubles of the package's injectable parts (kept out of the package: users never need them)."""

from __future__ import annotations

import random
from typing import Any

from lightning_batch.plugin.checks import checked, fraction
from lightning_batch.plugin.memory import (
    BatchOutOfMemoryError,
    MemoryMeter,
    MemoryProbe,
    MemoryProbeResult,
    RunStep,
)


class FakeMemoryMeter(MemoryMeter):
    """A simulated device for tests: a step at ``B`` takes ``base + per_sample * B + quadratic * B**2`` bytes
    (times ``1 + noise * N(0, 1)``), and raises :class:`BatchOutOfMemoryError` above ``capacity_bytes`` or
    above ``oom_above`` samples (an OOM the peak figures don't predict, e.g. fragmentation or a cuDNN
    workspace). The budget is ``budget_fraction * capacity_bytes``. ``run_step`` is still called, so tests
    can record what was tried.

    >>> m = FakeMemoryMeter(base_bytes=100, bytes_per_sample=10, capacity_bytes=1000, budget_fraction=0.5)
    >>> m.budget_bytes(), m.measure(lambda b: None, 8)
    (500, 180)
    """

    name = "fake"

    def __init__(
        self,
        base_bytes: float,
        bytes_per_sample: float,
        capacity_bytes: float,
        *,
        budget_fraction: float = 0.9,
        quadratic: float = 0.0,
        noise: float = 0.0,
        oom_above: int | None = None,
        seed: int = 0,
    ) -> None:
        if base_bytes < 0 or bytes_per_sample <= 0 or capacity_bytes <= 0 or quadratic < 0 or noise < 0:
            raise ValueError(
                "FakeMemoryMeter needs base_bytes >= 0, bytes_per_sample > 0, capacity_bytes > 0, "
                f"quadratic >= 0, noise >= 0; got {base_bytes!r}, {bytes_per_sample!r}, {capacity_bytes!r}, "
                f"{quadratic!r}, {noise!r}. Pass sizes in bytes."
            )
        self.base_bytes = base_bytes
        self.bytes_per_sample = bytes_per_sample
        self.capacity_bytes = capacity_bytes
        self.budget_fraction = checked("budget_fraction", budget_fraction, fraction(), 0.9)
        self.quadratic = quadratic
        self.noise = noise
        self.oom_above = oom_above
        self._rng = random.Random(seed)
        self.calls: list[int] = []

    def bytes_at(self, batch_size: int) -> float:
        """The noise-free memory curve."""
        return self.base_bytes + self.bytes_per_sample * batch_size + self.quadratic * batch_size**2

    def budget_bytes(self) -> int:
        return int(self.budget_fraction * self.capacity_bytes)

    def measure(self, run_step: RunStep, batch_size: int) -> int:
        self.calls.append(batch_size)
        run_step(batch_size)
        peak = self.bytes_at(batch_size) * (1.0 + self.noise * self._rng.gauss(0.0, 1.0))
        if peak > self.capacity_bytes or (self.oom_above is not None and batch_size > self.oom_above):
            raise BatchOutOfMemoryError(f"fake OOM at batch {batch_size}")
        return int(peak)


def probe_max_batch(run_step: RunStep, meter: MemoryMeter, **kwargs: Any) -> MemoryProbeResult:
    """``MemoryProbe(meter, **kwargs).run(run_step)``.

    >>> meter = FakeMemoryMeter(base_bytes=0, bytes_per_sample=1_000, capacity_bytes=1_000_000)
    >>> probe_max_batch(lambda b: None, meter).ceiling  # no fixed cost: the safe jump lands on the true 900
    900
    """
    return MemoryProbe(meter, **kwargs).run(run_step)
