"""The memory probe, run on a fit: the largest batch whose training step fits in memory.

:class:`~lightning_batch.plugin.memory.MemoryProbe` is the algorithm (a few trial steps, a line
fitted through their peaks); this module runs it on a real network:
:func:`probe_training_ceiling` on a network, a loss and a way to build a batch of rows, and
:func:`probe_fit_ceiling` on a Lightning fit, each DDP rank probing its own share of the global
batch (the global ceiling is what the tightest rank holds, times the ranks).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_batch.plugin.memory import (
    CpuMemoryMeter,
    CudaMemoryMeter,
    MemoryMeter,
    MemoryProbe,
    MemoryProbeError,
    MemoryProbeResult,
)

__all__ = ["CUDA_START_BATCH", "probe_fit_ceiling", "probe_training_ceiling"]


#: The CUDA probe's first trial batch (see probe_training_ceiling).
CUDA_START_BATCH = 1024


def probe_training_ceiling(
    network: Any,
    loss_fn: Callable[[Any, Any], Any],
    sample_batch: Callable[[Any], tuple[Any, Any]],
    rows: int,
    device: Any,
    memory_budget: float,
    *,
    seed: int = 0,
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> MemoryProbeResult:
    """The largest batch whose training step fits ``memory_budget`` of free memory on ``device``.

    A trial step is the forward and backward of ``loss_fn(network(x), y)`` on ``sample_batch(index)``,
    ``index`` being random rows out of ``rows``, the forward inside ``forward_context()`` (the
    Trainer's precision plugin's, e.g. bf16 autocast). The probe leaves no trace: the network's parameters,
    buffers (running statistics), gradients and the random state are as before. Raises
    ``MemoryError`` with what to do when not even one row fits.

    >>> import torch
    >>> net, x, y = torch.nn.Linear(4, 1), torch.randn(64, 4), torch.randn(64, 1)
    >>> result = probe_training_ceiling(
    ...     net, torch.nn.functional.mse_loss, lambda i: (x[i], y[i]), 64, torch.device("cpu"), 0.5
    ... )
    >>> result.ceiling  # a linear model on 64 rows: all of them fit
    64
    """
    meter: MemoryMeter
    if device.type == "cuda":
        meter = CudaMemoryMeter(device, budget_fraction=memory_budget)
        # On a GPU the peak of a small batch is the fixed cost's (weights, their gradients, cuBLAS's
        # workspace): measured on an H200, an MLP's bytes per row from 8 and 975 rows came out 13% low,
        # so the jump to the ceiling overshot into an OOM. From 1,024 rows the slope is the large
        # batches' (benchmarks/gpu_check.py). An OOM there costs a trial and halves the start.
        start_batch = min(CUDA_START_BATCH, max(1, rows))
    else:
        # On a CPU an OOM kills the process: start small and grow under the conservative bound.
        meter = CpuMemoryMeter(budget_fraction=memory_budget)
        start_batch = min(8, max(1, rows))
    generator = torch.Generator().manual_seed(seed)
    timed: list[tuple[int, float]] = []

    def run_step(batch: int) -> None:
        # Timed as a training step's data and compute (the batch's rows gathered, forward, backward):
        # the per-row cost the policy's throughput model starts from (see seconds_per_row).
        start = time.perf_counter()
        x, y = sample_batch(torch.randint(rows, (batch,), generator=generator))
        with forward_context():
            loss = loss_fn(network(x.to(device)), y.to(device))
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed.append((batch, time.perf_counter() - start))
        network.zero_grad(set_to_none=True)

    buffers = {name: b.detach().clone() for name, b in network.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            run_step(min(8, rows))  # warm-up: lazy allocations are not per-sample cost
            network.zero_grad(set_to_none=True)
            timed.clear()
            result = MemoryProbe(meter, upper_bound=max(1, rows), start_batch=start_batch).run(run_step)
            # A trial that raised never reached the clock; one over budget did, and timed its rows.
            result.step_seconds = list(timed)
            return result
        except MemoryProbeError as exc:
            raise MemoryError(
                f"not even the smallest batch fits the memory budget (--memory-budget {memory_budget:g} "
                f"of free {meter.name} memory = {meter.budget_bytes() / 2**20:.1f} MiB); raise --memory-budget, "
                f"free memory, or use a smaller model ({exc})"
            ) from None
        finally:
            network.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, buffer in network.named_buffers():
                    buffer.copy_(buffers[name])


def probe_fit_ceiling(
    trainer: pl.Trainer,
    network: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    memory_budget: float,
) -> tuple[MemoryProbeResult, int]:
    """Probe this rank's share of the training data; ``(this rank's result, the global ceiling)``.

    Trial batches are built as the training loader builds them: the dataset's batched read
    (``__getitems__``) or its rows, through the loader's own collate; the first two items of a
    batch are the inputs and the targets of ``loss_fn(network(inputs), targets)``.
    """
    loader = trainer.train_dataloader
    assert loader is not None
    dataset, collate = loader.dataset, loader.collate_fn
    batched = callable(getattr(dataset, "__getitems__", None))
    world = trainer.world_size

    def sample_batch(index: Tensor) -> tuple[Tensor, Tensor]:
        rows = dataset.__getitems__(index) if batched else [dataset[int(i)] for i in index]
        x, y = collate(rows)[:2]
        return x, y

    result = probe_training_ceiling(
        network,
        loss_fn,
        sample_batch,
        len(dataset) // world or 1,
        trainer.lightning_module.device,
        memory_budget,
        seed=trainer.global_rank,
        # Under the Trainer's precision: autocast changes the activations' bytes per row.
        forward_context=trainer.precision_plugin.forward_context,
    )
    local = result.ceiling
    if world > 1:
        local = int(trainer.strategy.reduce(torch.tensor(float(local)), reduce_op="min"))
    return result, max(1, local * world)
