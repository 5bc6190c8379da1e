r"""Gradient noise scale estimation (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

The *simple noise scale* is

.. math::  B_\text{simple} = \operatorname{tr}(\Sigma) / |G|^2

where :math:`G` is the true (full-data) gradient and :math:`\Sigma` the covariance of per-example
gradients.  It predicts the batch size above which larger batches stop paying off.  This module is pure
PyTorch (it does not import Lightning) so it can be tested and reused on its own.

Unbiased estimator
------------------
Let every per-example gradient be an iid draw with mean :math:`G` and covariance :math:`\Sigma`.  Take
``n`` "small" gradients :math:`g_1..g_n`, each the mean over ``b`` (= ``small_batch``) examples, and
their mean :math:`\bar g` (a "big" gradient over ``n*b`` examples).  Measure

* ``S = mean_j |g_j|^2``  (mean squared norm of the small gradients),
* ``T = |mean_j g_j|^2``  (squared norm of the big gradient).

Because :math:`E|X|^2 = |E X|^2 + \operatorname{tr}\operatorname{Cov}(X)` and averaging ``k`` iid
examples divides the covariance by ``k``:

.. math::
    E[S] = |G|^2 + \operatorname{tr}(\Sigma)/b, \qquad E[T] = |G|^2 + \operatorname{tr}(\Sigma)/(n b).

Subtracting, :math:`E[S - T] = \operatorname{tr}(\Sigma)\,(n-1)/(n b)`, and solving the two linear
equations gives unbiased estimates (linearity of expectation: it does not matter that ``S`` and ``T``
are computed from the same samples)

.. math::
    \widehat{|G|^2} = \frac{n T - S}{n - 1}, \qquad
    \widehat{\operatorname{tr}\Sigma} = \frac{n b\,(S - T)}{n - 1}.

This is exactly McCandlish et al.'s appendix A.1 formula with :math:`B_\text{small}=b`,
:math:`B_\text{big}=n b`:
:math:`|G|^2 \approx (B_\text{big}|G_\text{big}|^2 - B_\text{small}|G_\text{small}|^2)/(B_\text{big} -
B_\text{small}) = (n b T - b S)/(n b - b)` and
:math:`\operatorname{tr}\Sigma \approx (|G_\text{small}|^2 - |G_\text{big}|^2)/(1/B_\text{small} -
1/B_\text{big}) = (S - T)\,n b/(n - 1)` (using the mean ``S`` of ``n`` small batches instead of a single
one only lowers the variance).

The same function :func:`unbiased_grad_stats` serves every source of "small" gradients:

* per-example gradients vs the batch gradient: ``small_batch=1, n=B``
  (:mod:`~lightning_batch.plugin.per_example`, checked against ``torch.func`` per-example gradients);
* per-rank vs all-reduced gradient under DDP: ``small_batch=local batch, n=world size`` (ranks must use
  equal local batch sizes);
* micro-batch vs accumulated gradient: ``small_batch=micro-batch size, n=number of micro-batches``
  (:func:`microbatch_grad_stats`).

Both estimates are unbiased but noisy; a single step's ``|G|^2`` estimate can be negative when the
noise dominates the signal.  Average the two quantities separately over steps (:class:`NoiseScaleEMA`)
and take the ratio of the averages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_batch.plugin.checks import checked, count, integer, positive_int
from lightning_batch.plugin.options import BatchSizeOptions as _Declared  # the declared defaults
from lightning_batch.plugin.per_example import (
    COUPLED,
    PerExampleNorms,
    PerExampleResult,
    measurements_suspended,
)

__all__ = [
    "GradNoiseStats",
    "NoiseMeter",
    "NoiseScaleEMA",
    "batch_rows",
    "looped_microbatch_stats",
    "microbatch_grad_stats",
    "noise_scale",
    "slice_batch",
    "unbiased_grad_stats",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: The fewest rows of a micro-batch that a batch norm in training mode normalises (its statistics
#: over a row or two are not the training step's).
MIN_NORMALISED_ROWS = 4


def unbiased_grad_stats(
    mean_small_sqr_norm: float, big_sqr_norm: float, n: int, small_batch: int
) -> tuple[float, float]:
    """Unbiased estimates ``(grad_sqr, trace_sigma)`` of ``|G|^2`` and ``tr(Sigma)``.

    Args:
        mean_small_sqr_norm: ``S``, the mean over ``n`` small gradients of their squared norms.
        big_sqr_norm: ``T``, the squared norm of the mean of those ``n`` small gradients.
        n: number of small gradients (>= 2; with one sample the variance is not identifiable).
        small_batch: number of examples averaged in each small gradient (>= 1).

    Returns:
        ``(grad_sqr, trace_sigma)`` = ``((n T - S)/(n - 1), n b (S - T)/(n - 1))``.  Either may be
        negative for a single measurement (they are unbiased, not constrained).

    Example (per-example gradients 1, 3 -> mean 2; b=1, n=2):

    >>> unbiased_grad_stats(mean_small_sqr_norm=(1 + 9) / 2, big_sqr_norm=4.0, n=2, small_batch=1)
    (3.0, 2.0)
    """
    n = checked("n (number of small gradients)", n, integer(minimum=2), 2)
    b = checked("small_batch (examples per small gradient)", small_batch, positive_int, 1)
    s = float(mean_small_sqr_norm)
    t = float(big_sqr_norm)
    grad_sqr = (n * t - s) / (n - 1)
    trace_sigma = n * b * (s - t) / (n - 1)
    return grad_sqr, trace_sigma


def noise_scale(grad_sqr: float, trace_sigma: float) -> float | None:
    """Simple noise scale ``tr(Sigma) / |G|^2`` from (averaged) estimates.

    Returns ``None`` when ``grad_sqr <= 0`` or either value is not finite: the estimate of ``|G|^2`` is
    unbiased, not positive, and dividing by a value near or below zero yields a meaningless (huge or
    negative) "batch size".  A negative ``trace_sigma`` estimate means the noise is below the
    measurement's resolution, so it is clamped to ``0.0``.

    >>> noise_scale(2.0, 8.0)
    4.0
    >>> noise_scale(-1.0, 8.0) is None
    True
    >>> noise_scale(2.0, -1.0)
    0.0
    """
    g = float(grad_sqr)
    tr = float(trace_sigma)
    if not (math.isfinite(g) and math.isfinite(tr)) or g <= 0.0:
        return None
    return max(tr, 0.0) / g


@dataclass(frozen=True)
class GradNoiseStats:
    """One measurement: the raw norms and the unbiased estimates derived from them.

    Attributes:
        small_sqr_norm: ``S``, mean squared norm of the ``n`` small gradients.
        big_sqr_norm: ``T``, squared norm of their mean.
        grad_sqr: unbiased estimate of ``|G|^2`` (may be negative).
        trace_sigma: unbiased estimate of ``tr(Sigma)`` of *per-example* gradients (may be negative).
        n: number of small gradients.
        small_batch: examples per small gradient.
    """

    small_sqr_norm: float
    big_sqr_norm: float
    grad_sqr: float
    trace_sigma: float
    n: int
    small_batch: int

    @classmethod
    def from_norms(
        cls, small_sqr_norm: float, big_sqr_norm: float, n: int, small_batch: int
    ) -> GradNoiseStats:
        """Build the record, computing the estimates with :func:`unbiased_grad_stats`.

        >>> GradNoiseStats.from_norms(5.0, 4.0, n=2, small_batch=1).noise_scale
        0.6666666666666666
        """
        grad_sqr, trace_sigma = unbiased_grad_stats(small_sqr_norm, big_sqr_norm, n, small_batch)
        return cls(
            float(small_sqr_norm), float(big_sqr_norm), grad_sqr, trace_sigma, int(n), int(small_batch)
        )

    @property
    def noise_scale(self) -> float | None:
        """Single-measurement noise scale (very noisy; prefer :class:`NoiseScaleEMA`)."""
        return noise_scale(self.grad_sqr, self.trace_sigma)


# --------------------------------------------------------------------------------------------------
# Micro-batches: the fall-back for parameters no per-example rule covers
# --------------------------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module, param_names: Iterable[str] | None) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if param_names is None:
        return params
    wanted = list(param_names)
    missing = [name for name in wanted if name not in params]
    if missing:
        raise ValueError(f"unknown or frozen parameters: {missing}")
    return {name: params[name] for name in wanted}


def microbatch_grad_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    num_microbatches: int,
    *,
    param_names: Iterable[str] | None = None,
    restore_buffers: bool = True,
    vectorize: bool | None = None,
) -> GradNoiseStats:
    """Statistics from ``num_microbatches`` equal micro-batch gradients of one batch (any model).

    Splits the batch into ``n`` contiguous micro-batches of ``b = B / n`` examples, computes each
    micro-batch's gradient of ``loss_fn`` (which must be the *mean* over the micro-batch) --
    ``.grad`` is left untouched and no optimizer step happens -- and returns
    :func:`unbiased_grad_stats` with ``small_batch=b``.  With ``n = B`` this is the exact
    per-example estimator.

    Two ways to get the ``n`` gradients, with the same result:

    * ``vectorize=True``: one ``torch.func.vmap(grad(...))`` call over the ``n`` micro-batches, a
      single batched forward+backward: for a small model several times faster than the loop, whose
      per-pass overhead dominates (``benchmarks/noise_overhead.py --model cnn`` measures both).
    * ``vectorize=False``: a Python loop of ``n`` forward+``torch.autograd.grad`` passes over ``b``
      examples each. It works for every module, including those that update buffers in place
      (BatchNorm's running statistics), which ``vmap`` refuses.

    The default (``None``) vectorizes models without buffers and loops over the others.

    Cost: the compute of one batch step plus ``n`` copies of the selected gradients (vectorized) or
    one (loop).  Buffers are restored afterwards when ``restore_buffers``; RNG state (dropout) does
    advance.  Pass the unwrapped module, not a DDP wrapper (its reducer expects a regular backward).

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> s = microbatch_grad_stats(net, nn.functional.mse_loss, x, y, num_microbatches=4)
    >>> s.n, s.small_batch
    (4, 2)
    """
    n = checked("num_microbatches", num_microbatches, integer(minimum=2), 2)
    batch = int(inputs.shape[0])
    if batch % n != 0:
        raise ValueError(f"batch size {batch} is not divisible by num_microbatches={n}")
    if int(targets.shape[0]) != batch:
        raise ValueError(f"inputs and targets disagree on the batch size: {batch} vs {targets.shape[0]}")
    b = batch // n
    params = trainable_parameters(model, param_names)
    if not params:
        raise ValueError(
            "no trainable parameter to measure: pass param_names that name some (or None for all)"
        )
    if vectorize is None:
        vectorize = next(model.buffers(), None) is None
    if vectorize:
        return _vectorized_microbatch_stats(model, loss_fn, inputs, targets, n, params)
    parts = [
        partial(_microbatch_loss, model, loss_fn, inputs[j * b : (j + 1) * b], targets[j * b : (j + 1) * b])
        for j in range(n)
    ]
    return looped_microbatch_stats(parts, list(params.values()), b, model if restore_buffers else None)


def _microbatch_loss(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> Tensor:
    return loss_fn(model(inputs), targets)


def looped_microbatch_stats(
    losses: Sequence[Callable[[], Tensor]],
    params: Sequence[Tensor],
    small_batch: int,
    restore: nn.Module | None = None,
    weights: Sequence[Tensor | None] | None = None,
) -> GradNoiseStats:
    """Statistics from the gradients of ``params`` of each loss in ``losses`` (one per micro-batch
    of ``small_batch`` examples, each a mean over them): ``.grad`` is left untouched, and
    ``restore``'s buffers (BatchNorm's running statistics) are as before. ``weights`` (one per
    parameter, or None) make each squared norm ``Σ weight · g²`` (a diagonal preconditioner's).

    >>> torch.manual_seed(0) and None
    >>> net, x, y = nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 1)
    >>> halves = [lambda j=j: nn.functional.mse_loss(net(x[2 * j : 2 * j + 2]), y[2 * j : 2 * j + 2]) for j in range(2)]
    >>> stats = looped_microbatch_stats(halves, list(net.parameters()), small_batch=2)
    >>> stats.n, stats.small_batch
    (2, 2)
    """
    n = len(losses)
    saved_buffers = (
        {k: v.detach().clone() for k, v in restore.named_buffers()} if restore is not None else None
    )
    acc_dtype = torch.promote_types(params[0].dtype, torch.float32) if params else torch.float32
    device = params[0].device if params else None
    # Accumulate on the device; a single host sync at the end.
    sqr_sum = torch.zeros((), dtype=acc_dtype, device=device)
    grad_sum = [torch.zeros_like(p, dtype=acc_dtype) for p in params]
    weighted = list(weights) if weights is not None else [None] * len(params)
    try:
        with torch.enable_grad(), measurements_suspended():
            for loss_of_part in losses:
                grads = torch.autograd.grad(loss_of_part(), list(params), allow_unused=True)
                for acc, g, w in zip(grad_sum, grads, weighted, strict=True):
                    if g is None:  # parameter not used by this loss: its gradient is exactly zero
                        continue
                    g = g.detach().to(acc_dtype)
                    sqr_sum += _squared_norm(g, w)
                    acc += g
    finally:
        if restore is not None and saved_buffers is not None:
            with torch.no_grad():
                for k, v in restore.named_buffers():
                    if k in saved_buffers:
                        v.copy_(saved_buffers[k])
    big = (
        float(sum(_squared_norm(acc / n, w) for acc, w in zip(grad_sum, weighted, strict=True)))
        if grad_sum
        else 0.0
    )
    return GradNoiseStats.from_norms(float(sqr_sum) / n, big, n, small_batch)


def _squared_norm(grad: Tensor, weight: Tensor | None) -> Tensor:
    """``|g|²``, or ``Σ weight · g²`` with a weight."""
    squares = grad.pow(2)
    return (squares * weight.to(squares.dtype) if weight is not None else squares).sum()


def _vectorized_microbatch_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    n: int,
    selected: dict[str, nn.Parameter],
) -> GradNoiseStats:
    """:func:`microbatch_grad_stats` with the ``n`` micro-batch gradients from one ``vmap`` call."""
    b = int(inputs.shape[0]) // n
    params = {k: v.detach() for k, v in selected.items()}
    others = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    buffers = dict(model.named_buffers())

    def microbatch_loss(trainable: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(model, ({**others, **trainable}, buffers), (x,)), t)

    # randomness="different": each micro-batch draws its own dropout mask, as in the loop.
    per_microbatch = torch.func.vmap(
        torch.func.grad(microbatch_loss), in_dims=(None, 0, 0), randomness="different"
    )
    with torch.enable_grad(), measurements_suspended():
        grads = per_microbatch(
            params, inputs.reshape(n, b, *inputs.shape[1:]), targets.reshape(n, b, *targets.shape[1:])
        )
    acc_dtype = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
    flat = torch.cat([g.reshape(n, -1).to(acc_dtype) for g in grads.values()], dim=1)  # (n, P)
    small = float(flat.pow(2).sum()) / n
    big = float(flat.mean(dim=0).pow(2).sum())
    return GradNoiseStats.from_norms(small, big, n, b)


# --------------------------------------------------------------------------------------------------
# Smoothing
# --------------------------------------------------------------------------------------------------


class NoiseScaleEMA:
    """Bias-corrected exponential moving averages of ``|G|^2`` and ``tr(Sigma)`` estimates.

    The two quantities are averaged *separately* and the noise scale is the ratio of the averages:
    single-step ``|G|^2`` estimates are noisy and can be ~0 or negative, so an average of per-step
    ratios is dominated by (and biased by) those steps, while the ratio of averages is consistent.
    Adam-style bias correction (divide by the total weight, ``1 - decay^t`` for a constant decay)
    makes the first values usable instead of being pulled towards the zero initialisation.

    Two ways to forget:

    - ``decay`` per measurement (``half_life_share=None``): simple, but its window in *samples*
      grows with the batch (measurements every 20 steps at B=2048 lie 64× more samples apart than at
      B=32), so the estimate lags most exactly when the noise scale grows fastest.
    - a window in samples (``half_life_share``, with ``samples`` given to :meth:`update`): a
      measurement ``n`` samples after the previous one decays the past by ``0.5 ** (n / h)``, with
      the half-life ``h = max(min_half_life, half_life_share × samples seen)``. A half-life that is
      a share of the run so far follows the noise scale on the log scale its growth lives on (the
      loss falls roughly with the log of the samples): early, a few hundred samples; after an epoch
      of 10⁶ rows, 2.5·10⁵ with a share of 0.25.

    >>> ema = NoiseScaleEMA(decay=0.5)
    >>> ema.update(grad_sqr=1.0, trace_sigma=1.0)
    >>> ema.grad_sqr, ema.gns  # bias correction: the first value is returned as is
    (1.0, 1.0)
    >>> ema.update(grad_sqr=3.0, trace_sigma=1.0)
    >>> round(ema.gns, 4)  # 1 / (7/3); averaging the ratios 1 and 1/3 would give 5/9 = 0.5556
    0.4286
    >>> windowed = NoiseScaleEMA(half_life_share=0.5)
    >>> windowed.update(1.0, 1.0, samples=100)  # h = 50: weight 1 - 0.5 ** 2 = 0.75
    >>> windowed.update(3.0, 1.0, samples=100)  # h = 0.5 * 200 = 100 samples: the past keeps 0.5
    >>> round(windowed.grad_sqr, 4)  # (0.5 * 0.75 * 1 + 0.5 * 3) / (0.5 * 0.75 + 0.5)
    2.1429
    """

    def __init__(
        self,
        decay: float = _Declared.ema_decay,
        *,
        half_life_share: float | None = None,
        min_half_life: float = 0.0,
    ) -> None:
        self.decay = self._check_decay(decay)
        if half_life_share is not None and not (0.0 < float(half_life_share) <= 10.0):
            raise ValueError(f"half_life_share must be in (0, 10], got {half_life_share}; e.g. 0.25")
        self.half_life_share = None if half_life_share is None else float(half_life_share)
        if not (math.isfinite(min_half_life) and min_half_life >= 0.0):
            raise ValueError(f"min_half_life must be a number of samples >= 0, got {min_half_life}")
        self.min_half_life = float(min_half_life)
        self._ema_grad_sqr = 0.0
        self._ema_trace_sigma = 0.0
        self._weight = 0.0  # the averages' total weight (the bias correction divides by it)
        self._samples = 0.0  # samples seen through the measurements so far (the window's clock)
        self._num_updates = 0

    @staticmethod
    def _check_decay(decay: float) -> float:
        decay = float(decay)
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        return decay

    def decay_for(self, samples: float | None) -> float:
        """The weight the past keeps at a measurement ``samples`` after the previous one."""
        if self.half_life_share is None or samples is None:
            return self.decay
        half_life = max(self.min_half_life, self.half_life_share * (self._samples + samples), 1e-12)
        return float(0.5 ** (samples / half_life))

    def update(self, grad_sqr: float, trace_sigma: float, samples: float | None = None) -> None:
        """Add one measurement (floats or 0-dim tensors), taken ``samples`` samples after the
        previous one (used by the window in samples).  Non-finite values raise ``ValueError``
        because a single NaN would otherwise poison the averages forever."""
        g, tr = float(grad_sqr), float(trace_sigma)
        if not (math.isfinite(g) and math.isfinite(tr)):
            raise ValueError(f"non-finite gradient statistics: grad_sqr={g}, trace_sigma={tr}")
        if samples is not None and not (math.isfinite(samples) and samples >= 0):
            raise ValueError(f"samples must be a count >= 0, got {samples}")
        d = self.decay_for(samples)
        self._ema_grad_sqr = d * self._ema_grad_sqr + (1.0 - d) * g
        self._ema_trace_sigma = d * self._ema_trace_sigma + (1.0 - d) * tr
        self._weight = d * self._weight + (1.0 - d)
        self._samples += samples or 0.0
        self._num_updates += 1

    def reset(self) -> None:
        """Forget all measurements."""
        self._ema_grad_sqr = 0.0
        self._ema_trace_sigma = 0.0
        self._weight = 0.0
        self._samples = 0.0
        self._num_updates = 0

    @property
    def num_updates(self) -> int:
        """Number of :meth:`update` calls since construction / reset."""
        return self._num_updates

    def _correction(self) -> float:
        # A first update with decay 0 or a window gives weight > 0; guard the all-decay-1 corner.
        return self._weight if self._weight > 0.0 else 1.0

    @property
    def grad_sqr(self) -> float | None:
        """Bias-corrected average ``|G|^2`` estimate (may be negative), ``None`` before any update."""
        return None if self._num_updates == 0 else self._ema_grad_sqr / self._correction()

    @property
    def grad_var(self) -> float | None:
        """Bias-corrected average ``tr(Sigma)`` estimate, ``None`` before any update."""
        return None if self._num_updates == 0 else self._ema_trace_sigma / self._correction()

    @property
    def gns(self) -> float | None:
        """``grad_var / grad_sqr`` (ratio of averages).  ``None`` before any update and while the averaged
        ``|G|^2`` estimate is ``<= 0`` (no meaningful value yet); a negative ``tr(Sigma)`` average is
        clamped to ``0.0``.  See :func:`noise_scale`."""
        if self._num_updates == 0:
            return None
        # The bias corrections cancel in the ratio; use the corrected values for clarity anyway.
        return noise_scale(self.grad_sqr, self.grad_var)  # type: ignore[arg-type]

    def as_row(self) -> dict[str, float]:
        """``gns``, ``grad_sqr`` and ``grad_var`` for a metrics row (NaN where not yet known)."""
        values = {"gns": self.gns, "grad_sqr": self.grad_sqr, "grad_var": self.grad_var}
        return {key: float(value) if value is not None else math.nan for key, value in values.items()}

    def state_dict(self) -> dict[str, float | int | None]:
        """Plain Python numbers only, so ``torch.load(..., weights_only=True)`` can restore it."""
        return {
            "decay": self.decay,
            "ema_grad_sqr": self._ema_grad_sqr,
            "ema_trace_sigma": self._ema_trace_sigma,
            "num_updates": self._num_updates,
            "weight": self._weight,
            "samples": self._samples,
            "half_life_share": self.half_life_share,
            "min_half_life": self.min_half_life,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (values may be floats, ints or 0-dim tensors). A state
        from before the window in samples (four keys) restores with its constant decay."""
        required = {"decay", "ema_grad_sqr", "ema_trace_sigma", "num_updates"}
        optional = {"weight", "samples", "half_life_share", "min_half_life"}
        if not required <= set(state_dict) <= required | optional:
            raise KeyError(f"expected keys {sorted(required | optional)}, got {sorted(state_dict)}")
        decay = self._check_decay(float(state_dict["decay"]))
        num_updates = checked("num_updates", int(state_dict["num_updates"]), count, 0)
        self.decay = decay
        self._ema_grad_sqr = float(state_dict["ema_grad_sqr"])
        self._ema_trace_sigma = float(state_dict["ema_trace_sigma"])
        self._num_updates = num_updates
        self._weight = float(state_dict.get("weight", 1.0 - decay**num_updates))
        self._samples = float(state_dict.get("samples", 0.0))
        if "half_life_share" in state_dict:
            share = state_dict["half_life_share"]
            self.half_life_share = None if share is None else float(share)
            self.min_half_life = float(state_dict.get("min_half_life", 0.0))


# --------------------------------------------------------------------------------------------------
# One training step's measurement
# --------------------------------------------------------------------------------------------------


class NoiseMeter:
    """One training step's unbiased ``(|G|², tr(Σ))`` for the parameters an optimizer updates.

    The parameters every use of which has a per-example rule are measured exactly
    (:class:`~lightning_batch.plugin.per_example.PerExampleNorms`); the others, when a
    ``batch_loss`` (the training loss of any batch, e.g. a
    :class:`~lightning_batch.plugin.step_loss.StepLoss`) is given, from micro-batches of the step's
    batch (:func:`looped_microbatch_stats`) on ``fallback`` steps: a partial estimate of such a model
    would bias the EMAs, so other steps give None. Without a ``batch_loss`` the estimate covers the
    exact part only: :attr:`measured_fraction` and :attr:`reasons` say how much, and why not the rest.

    The caller drives one step at a time:

    1. :meth:`begin_step` before the forward (whether to measure, the batch), and :meth:`next_pass`
       before each further pass of the step (gradient accumulation's micro-batches);
    2. :meth:`before_backward` and :meth:`after_backward` around each backward;
    3. :meth:`before_optimizer_step`, before the optimizer moves the weights;
    4. :meth:`estimate` with the step's rows over all ranks; :attr:`last_estimate` keeps it.

    ``grad_from_params``: the batch gradient's squared norm is read from ``.grad`` after each
    backward; with gradient accumulation (False) ``.grad`` also holds earlier micro-batches', so the
    difference across this backward is read instead.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
        >>> meter = NoiseMeter(dict(net.named_parameters()))
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> meter.begin_step(measure=True, batch=(x, y))
        >>> nn.functional.mse_loss(net(x), y).backward()
        >>> meter.after_backward()
        >>> meter.before_optimizer_step()
        >>> grad_sqr, trace = meter.estimate(global_rows=16)
        >>> grad_sqr > 0 and trace > 0, meter.measured_fraction
        (True, 1.0)
        >>> meter.remove()
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        *,
        module: nn.Module | None = None,
        batch_loss: Callable[[Any], Tensor] | None = None,
        grad_from_params: bool = True,
        fallback_microbatches: int = _Declared.fallback_microbatches,
        preconditioner: Callable[[], Mapping[str, Tensor]] | None = None,
    ) -> None:
        self.params = {name: p for name, p in params.items() if p.requires_grad}
        #: ``{name: 1 / P²}`` now, for an adaptive optimizer's parameters (see
        #: :class:`~lightning_batch.plugin.preconditioner.Preconditioner`): measured as its step sees
        #: them, ``g / P``; the others (and all, without one) raw.
        self.preconditioner = preconditioner
        self._weights: Mapping[str, Tensor] | None = None
        self.module = module
        self.batch_loss = batch_loss
        self.grad_from_params = grad_from_params
        self.fallback_microbatches = fallback_microbatches
        self.norms = PerExampleNorms(self.params, module.modules() if module is not None else ())
        #: The parameters the last measured step measured exactly (None before the first).
        self.exact: tuple[str, ...] | None = None
        #: Why each other parameter was not measured exactly (as of the last measured step).
        self.reasons: dict[str, str] = {}
        #: The last :meth:`estimate` (None: that step could not be measured).
        self.last_estimate: tuple[float, float] | None = None
        self._measuring = False
        self._fallback_batch: Any = None
        self._result: PerExampleResult | None = None
        self._grad_t: Tensor | None = None
        self._grad_names: list[str] = []
        self._grads_before: dict[str, Tensor] | None = None
        self._fallback_stats: GradNoiseStats | None = None

    # -- what is measured -----------------------------------------------------------------------------

    @property
    def measuring(self) -> bool:
        """Whether the current step is measured (set by :meth:`begin_step`)."""
        return self._measuring

    @property
    def inexact(self) -> tuple[str, ...]:
        """The parameters the last measured step could not measure exactly (all, before the first)."""
        if self.exact is None:
            return tuple(self.params)
        return tuple(name for name in self.params if name not in self.exact)

    @property
    def can_fall_back(self) -> bool:
        """A ``batch_loss``: the inexact parameters are measured with micro-batches."""
        return self.batch_loss is not None

    @property
    def measured_fraction(self) -> float | None:
        """The share of the parameters' elements measured exactly (None before the first measurement)."""
        if self.exact is None:
            return None
        total = sum(p.numel() for p in self.params.values())
        exact = sum(self.params[name].numel() for name in self.exact if name in self.params)
        return exact / total if total else 0.0

    @property
    def covered_fraction(self) -> float | None:
        """The share measured at all: exactly, or by micro-batches when :attr:`can_fall_back`."""
        exact = self.measured_fraction
        return None if exact is None else 1.0 if self.can_fall_back else exact

    # -- the step -------------------------------------------------------------------------------------

    def begin_step(self, measure: bool, batch: Any = None, fallback: bool = True) -> None:
        """Before the step's forward: measure it or not; ``batch`` tells the examples (and feeds the
        micro-batches on ``fallback`` steps)."""
        self.norms.stop()
        rows = batch_rows(batch)
        self._measuring = measure and rows is not None and rows >= 1
        self._result, self._grad_t, self._grads_before, self._fallback_stats = None, None, None, None
        self._fallback_batch, self._weights = None, None
        if not self._measuring:
            return
        assert rows is not None
        self.norms.start(rows)
        if fallback and self.can_fall_back:
            self._fallback_batch = batch

    def next_pass(self, batch: Any) -> None:
        """Before a further pass of the same optimizer step (a gradient-accumulation micro-batch).

        A measured step spans all its passes: the per-example norms of every pass's rows, and ``.grad``
        after the last backward (the whole step's mean gradient), so a step measures the same as one
        pass over all its rows would.
        """
        rows = batch_rows(batch)
        if self._measuring and rows is not None:
            self.norms.resume(rows)

    def before_backward(self) -> None:
        """Before a backward: with accumulation, ``.grad`` as it was (to read this backward's part)."""
        if self._measuring and not self.grad_from_params:
            self._grads_before = {
                name: p.grad.detach().clone() for name, p in self.params.items() if p.grad is not None
            }

    def after_backward(self) -> None:
        """After a backward (under DDP: after the gradient all-reduce, so ``.grad`` is the global mean)."""
        if not self._measuring:
            return
        with self.norms.suspended():
            grads = []
            for name, p in self.params.items():
                if p.grad is None:
                    continue
                grad = p.grad.detach()
                if self._grads_before is not None and name in self._grads_before:
                    grad = grad - self._grads_before[name]
                grads.append(grad)
            # Kept per parameter until the step's exact set is known (before_optimizer_step).
            self._grad_names = [name for name, p in self.params.items() if p.grad is not None]
            weights = self._step_weights()
            if not grads:
                self._grad_t = None
            elif weights:  # preconditioned: each weighted by 1/P² (raw where the optimizer has no state)
                self._grad_t = torch.stack(
                    [
                        _squared_norm(g.to(torch.promote_types(g.dtype, torch.float32)), weights.get(name))
                        for name, g in zip(self._grad_names, grads, strict=True)
                    ]
                )
            else:
                self._grad_t = torch.stack(torch._foreach_norm(grads)).pow(2)

    def before_optimizer_step(self) -> None:
        """Before the optimizer moves the weights: the step's per-example norms, and its micro-batches."""
        if not self._measuring or not self.norms.active:
            return
        self._result = self.norms.finish(self._step_weights())
        if self._result is not None:
            self.exact, self.reasons = self._result.exact, self._result.reasons
        else:  # nothing this step used was measured exactly
            self.exact = ()
            self.reasons = {
                name: self.norms.reasons.get(name, "not used by a function with a per-example rule")
                for name in self.params
            }
        if self._fallback_batch is not None and self.inexact:
            batch, self._fallback_batch = self._fallback_batch, None
            self._fallback_stats = self._microbatch_stats(batch)

    def end_step(self) -> None:
        """The step is over (in case no optimizer step ran: a skipped step stops being watched)."""
        self.norms.stop()

    def estimate(self, global_rows: int) -> tuple[float, float] | None:
        """This step's ``(|G|², tr(Σ))``, or None when it can't be measured (also :attr:`last_estimate`)."""
        self.last_estimate = self._estimate(global_rows) if self._measuring else None
        return self.last_estimate

    def _estimate(self, global_rows: int) -> tuple[float, float] | None:
        result = self._result
        exact = set(result.exact) if result is not None else set()
        if self.can_fall_back and self._fallback_stats is None and any(n not in exact for n in self.params):
            return None  # not a fallback step, or the micro-batches could not be measured
        estimate: tuple[float, float] | None = None
        if result is not None and self._grad_t is not None:
            t = float(sum(v for name, v in zip(self._grad_names, self._grad_t, strict=True) if name in exact))
            per_example = result.per_example
            n = global_rows if self.grad_from_params else int(per_example.shape[0])
            if n < 2 or n < int(per_example.shape[0]):
                return None  # a one-row step: no variance to estimate
            stats = GradNoiseStats.from_norms(float(per_example.mean()), t, n, 1)
            estimate = (stats.grad_sqr, stats.trace_sigma)
        if self._fallback_stats is not None:
            # |G|² and tr(Σ) are sums over parameters: disjoint subsets add up.
            fallback = (self._fallback_stats.grad_sqr, self._fallback_stats.trace_sigma)
            estimate = (
                fallback if estimate is None else (estimate[0] + fallback[0], estimate[1] + fallback[1])
            )
        return estimate

    def _microbatch_stats(self, batch: Any) -> GradNoiseStats | None:
        """Statistics of the inexact parameters from ``fallback_microbatches`` equal parts of the batch's
        rows (a remainder is left out); None for a batch too small to split or out of memory."""
        rows = batch_rows(batch)
        batch_loss = self.batch_loss
        names = [name for name in self.inexact if name in self.params]
        if rows is None or batch_loss is None or not names:
            return None
        # A micro-batch normalised by a batch norm needs rows enough for its own statistics.
        coupled = any(self.reasons.get(name) == COUPLED for name in names)
        parts = min(self.fallback_microbatches, rows // (MIN_NORMALISED_ROWS if coupled else 1))
        if parts < 2:
            return None
        b = rows // parts
        losses = [
            partial(_loss_of_part, batch_loss, batch, slice(j * b, (j + 1) * b), rows) for j in range(parts)
        ]
        weights = self._step_weights()
        try:
            return looped_microbatch_stats(
                losses, [self.params[name] for name in names], b, self.module, [weights.get(n) for n in names]
            )
        except (RuntimeError, ValueError, MemoryError):
            return None

    def _step_weights(self) -> Mapping[str, Tensor]:
        """The preconditioner's weights for this step (read once: the optimizer's state moves only in
        its step, after the measurement)."""
        if self._weights is None:
            self._weights = self.preconditioner() if self.preconditioner is not None else {}
        return self._weights

    def remove(self) -> None:
        """Stop watching and take the module hooks off."""
        self.norms.remove()


def _loss_of_part(batch_loss: Callable[[Any], Tensor], batch: Any, part: slice, rows: int) -> Tensor:
    """The loss of the rows ``part`` of a batch of ``rows`` examples."""
    return batch_loss(slice_batch(batch, part, rows))


def slice_batch(batch: Any, part: slice, rows: int) -> Any:
    """The rows ``part`` of a batch of ``rows`` examples: every tensor whose first dimension is
    ``rows`` is sliced, anything else (a shared mask, a scalar) kept, in any nesting of tuples,
    lists, dicts and dataclasses.

    >>> part = slice_batch({"ids": torch.arange(6).view(3, 2), "scale": torch.tensor(2.0)}, slice(0, 2), rows=3)
    >>> part["ids"].tolist(), part["scale"].item()
    ([[0, 1], [2, 3]], 2.0)
    """

    def take(tensor: Tensor) -> Tensor:
        return tensor[part] if tensor.dim() > 0 and tensor.shape[0] == rows else tensor

    return apply_to_collection(batch, Tensor, take)


def batch_rows(batch: Any) -> int | None:
    """The examples in a batch: the first dimension of its first tensor (tuples, lists, dicts and
    HuggingFace's ``BatchEncoding`` alike), or None when it holds no tensor.

    >>> batch_rows({"input_ids": torch.zeros(4, 7), "labels": torch.zeros(4)}), batch_rows((torch.zeros(3, 2),))
    (4, 3)
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    )
    for value in values:
        rows = batch_rows(value)
        if rows is not None:
            return rows
    return None
