"""The memory probe, run on a fit: the largest batch whose training step fits in memory.

:class:`~lightning_batch.plugin.memory.MemoryProbe` is the algorithm (a few trial steps, a line
fitted through their peaks); this module runs it on a real network:
:func:`probe_training_ceiling` on a module and the loss of a batch of given rows, and
:func:`probe_fit_ceiling` on a Lightning fit (its loss from
:class:`~lightning_batch.plugin.step_loss.StepLoss`), each DDP rank probing its own share of the global
batch (the global ceiling is what the tightest rank holds, times the ranks).
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
from lightning_batch.plugin.step_loss import StepLoss

__all__ = ["CUDA_START_BATCH", "probe_fit_ceiling", "probe_training_ceiling"]


#: The CUDA probe's first trial batch (see probe_training_ceiling).
CUDA_START_BATCH = 1024


def probe_training_ceiling(
    trial_loss: Callable[[Tensor], Tensor],
    module: nn.Module,
    rows: int,
    device: torch.device,
    memory_budget: float,
    *,
    seed: int = 0,
) -> MemoryProbeResult:
    """The largest batch whose training step fits ``memory_budget`` of free memory on ``device``.

    A trial step is ``trial_loss(index)`` (the loss of a batch of the rows ``index``, drawn at random
    out of ``rows``: built, moved to the device and run forward) and its backward to ``module``'s
    trainable parameters. The probe leaves no trace: the parameters, their ``.grad``, the buffers
    (running statistics) and the random state are as before. Raises ``MemoryError`` with what to
    do when not even one row fits.

    >>> import torch
    >>> net, x, y = torch.nn.Linear(4, 1), torch.randn(64, 4), torch.randn(64, 1)
    >>> def trial_loss(index):
    ...     return torch.nn.functional.mse_loss(net(x[index]), y[index])
    >>> result = probe_training_ceiling(trial_loss, net, 64, torch.device("cpu"), 0.5)
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
    params = [p for p in module.parameters() if p.requires_grad]

    def run_step(batch: int) -> None:
        # Timed as a training step's data and compute (the batch's rows gathered, forward, backward):
        # the per-row cost the policy's throughput model starts from (see seconds_per_row).
        start = time.perf_counter()
        loss = trial_loss(torch.randint(rows, (batch,), generator=generator))
        # autograd.grad, not backward: the gradients are as large as .grad would be, and .grad (and a
        # DDP reducer's hooks on it) are left alone.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed.append((batch, time.perf_counter() - start))
        del loss, grads

    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            run_step(min(8, rows))  # warm-up: lazy allocations are not per-sample cost
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
            with torch.no_grad():
                for name, buffer in module.named_buffers():
                    if name in buffers:
                        buffer.copy_(buffers[name])


def probe_fit_ceiling(
    trainer: pl.Trainer, step_loss: StepLoss, memory_budget: float
) -> tuple[MemoryProbeResult, int]:
    """Probe this rank's share of the training data; ``(this rank's result, the global ceiling)``.

    Trial batches are built as the training loader builds them and their loss is the fit's
    (:class:`~lightning_batch.plugin.step_loss.StepLoss`: the module's ``loss()`` or its
    ``training_step``), under the Trainer's precision (autocast changes the activations' bytes per row).
    """
    loader = trainer.train_dataloader
    assert loader is not None
    world = trainer.world_size
    result = probe_training_ceiling(
        step_loss.trial_loss,
        trainer.lightning_module,
        len(loader.dataset) // world or 1,
        trainer.lightning_module.device,
        memory_budget,
        seed=trainer.global_rank,
    )
    local = result.ceiling
    if world > 1:
        local = int(trainer.strategy.reduce(torch.tensor(float(local)), reduce_op="min"))
    return result, max(1, local * world)
