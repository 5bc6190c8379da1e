"""Independent references the tests check the package against (kept out of the package: users never need them)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_batch.plugin.checks import checked, positive_int
from lightning_batch.plugin.noise import GradNoiseStats, LossFn, measurements_suspended, trainable_parameters


def per_sample_grad_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    param_names: Iterable[str] | None = None,
    chunk_size: int | None = None,
    randomness: Literal["different", "same", "error"] = "different",
) -> GradNoiseStats:
    """Exact per-example statistics for any model using ``torch.func`` (``vmap(grad(...))``).

    Each example ``inputs[i]`` is run as a batch of one: ``loss_fn(model(inputs[i:i+1]),
    targets[i:i+1])``, so ``loss_fn`` is the ordinary (mean) batch loss.  Works for any layer type
    (conv, normalisation over features, attention...), but not for layers that mix examples (BatchNorm in
    training mode).  Neither ``.grad`` nor buffers are modified.

    Cost: about one batch forward+backward of compute, but ``chunk_size x (number of parameters)``
    memory for the per-example gradients (``chunk_size`` defaults to the whole batch); examples are
    processed in chunks of ``chunk_size`` and reduced immediately.

    Args:
        param_names: restrict to these parameters (e.g. those a NoiseMeter could not measure exactly);
            default all parameters that require grad.
        randomness: passed to ``vmap``; ``"different"`` gives each example its own dropout mask.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(6, 3), torch.randn(6, 2)
    >>> per_sample_grad_stats(net, nn.functional.mse_loss, x, y).n
    6
    """
    batch = int(inputs.shape[0])
    if batch < 2:
        raise ValueError(f"need at least 2 examples, got {batch}")
    if int(targets.shape[0]) != batch:
        raise ValueError(f"inputs and targets disagree on the batch size: {batch} vs {targets.shape[0]}")
    chunk = batch if chunk_size is None else checked("chunk_size", chunk_size, positive_int, 1)
    params = {name: p.detach() for name, p in trainable_parameters(model, param_names).items()}
    others = {name: p.detach() for name, p in model.named_parameters() if name not in params}
    buffers = dict(model.named_buffers())

    def example_loss(trainable: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        out = torch.func.functional_call(model, ({**others, **trainable}, buffers), (x.unsqueeze(0),))
        return loss_fn(out, t.unsqueeze(0))

    per_example_grads = torch.func.vmap(
        torch.func.grad(example_loss), in_dims=(None, 0, 0), randomness=randomness
    )
    acc_dtype = (
        torch.promote_types(next(iter(params.values())).dtype, torch.float32) if params else torch.float32
    )
    sqr_sum = torch.zeros((), dtype=acc_dtype, device=inputs.device)
    grad_sum = {name: torch.zeros_like(p, dtype=acc_dtype) for name, p in params.items()}
    with torch.enable_grad(), measurements_suspended():
        for start in range(0, batch, chunk):
            grads = per_example_grads(params, inputs[start : start + chunk], targets[start : start + chunk])
            for name, g in grads.items():
                g = g.detach().to(acc_dtype)
                sqr_sum += g.flatten(1).pow(2).sum()
                grad_sum[name] += g.sum(dim=0)
    big = sum((v / batch).pow(2).sum() for v in grad_sum.values())
    return GradNoiseStats.from_norms(float(sqr_sum) / batch, float(big), batch, 1)
