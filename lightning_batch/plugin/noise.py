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

* per-example gradients vs the batch gradient: ``small_batch=1, n=B`` (:class:`PerExampleGradNorms`;
  the tests check it against ``torch.func`` per-example gradients);
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
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_batch.plugin.checks import checked, count, integer, positive_int
from lightning_batch.plugin.options import BatchSizeOptions as _Declared  # the declared defaults

__all__ = [
    "GradNoiseStats",
    "NoiseMeter",
    "NoiseScaleEMA",
    "PerExampleGradNorms",
    "microbatch_grad_stats",
    "noise_scale",
    "unbiased_grad_stats",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


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
# Per-example gradient norms of nn.Linear layers via hooks
# --------------------------------------------------------------------------------------------------


def _linear_weight_grad_sqr_norm(a: Tensor, g: Tensor) -> Tensor:
    """``|g^T a|_F^2`` for ``a`` (B, in), ``g`` (B, out) without always materialising ``g^T a``.

    ``|g^T a|^2 = sum_ij (a_i . a_j)(g_i . g_j)``: the Gram form costs ~``B^2 (in + out)`` flops and
    ``B^2`` memory, the direct product ~``B in out`` and ``in out`` memory; pick the cheaper so small
    batches on wide layers stay cheap.

    >>> a, g = torch.ones(2, 3), torch.ones(2, 4)
    >>> float(_linear_weight_grad_sqr_norm(a, g))  # g^T a is a 4x3 matrix of 2s
    48.0
    """
    batch, d_in = a.shape
    d_out = g.shape[1]
    if batch * (d_in + d_out) < d_in * d_out:
        return ((a @ a.T) * (g @ g.T)).sum()
    return (g.T @ a).pow(2).sum()


_suspension = threading.local()


@contextmanager
def measurements_suspended() -> Iterator[None]:
    """Make every :class:`PerExampleGradNorms` ignore forwards run inside (used by the fall-backs below,
    whose extra forward passes must not overwrite the step's measurement)."""
    _suspension.depth = getattr(_suspension, "depth", 0) + 1
    try:
        yield
    finally:
        _suspension.depth -= 1


def _should_ignore_forward() -> bool:
    if getattr(_suspension, "depth", 0) > 0 or not torch.is_grad_enabled():
        return True
    # Forwards inside torch.func transforms (vmap/grad: per-sample gradients of a user's own, or a test's
    # per-sample code) see one example at a time and batched tensors: they are not training steps.
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


@dataclass
class _LayerRecord:
    """What one covered Linear saw during the current measurement."""

    calls: int = 0
    backward_calls: int = 0
    input: Tensor | None = None
    input_version: int = 0
    per_example: Tensor | None = None  # (B,) per-example squared grad norm of this layer's params
    batch_sqr: Tensor | None = None  # 0-dim: squared norm of this layer's mean (batch) gradient
    problem: str | None = None  # set when this layer's params cannot be measured in this pass
    #: Raw per-example norms of the step's earlier passes (micro-batches), in row order.
    earlier_passes: list[Tensor] = field(default_factory=list)


class PerExampleGradNorms:
    """Exact per-example squared gradient norms for the ``nn.Linear`` layers of a module, via hooks.

    For a Linear ``y = W a + c`` with 2-D input ``a`` (batch, features) and ``g_i = dloss_i/dy_i``, the
    per-example gradients are ``g_i a_i^T`` and ``g_i``, so their squared norms are
    ``|a_i|^2 |g_i|^2`` and ``|g_i|^2`` -- no per-example gradient is ever materialised.  Contributions
    of all covered layers are summed per example.  The hooks also compute the squared norm of the
    *batch-mean* gradient of the covered parameters (``|sum_i g_i a_i^T|^2 / B^2`` etc.) from the same
    tensors, so the statistics do not depend on ``.grad`` (which may hold accumulated gradients from
    earlier micro-batches, or the all-reduced gradient under DDP).  :meth:`grad_stats` then applies
    :func:`unbiased_grad_stats` with ``n = B, small_batch = 1``.

    Loss scaling: with a *mean* loss the gradient reaching a layer's output is ``g_i / B``, so the
    per-example gradient of the per-example loss is ``B`` times the hook's row; pass
    ``loss_reduction="sum"`` if the loss is a sum over examples.  Only the batch-size normalisation is
    modelled -- any other constant factor in the loss scales ``|G|^2`` and ``tr(Sigma)`` alike and
    cancels in the noise scale.

    Coverage: a parameter is *covered* if it is the ``weight``/``bias`` of an ``nn.Linear`` (not a
    subclass that overrides ``forward``), is not shared with another module, and in the measured pass
    that Linear ran exactly once, on a 2-D input.  Everything else that requires grad is reported by
    :attr:`uncovered_parameter_names` (with :attr:`uncovered_reasons`) so callers can fall back, e.g. to
    :func:`microbatch_grad_stats`, or treat the estimate as one over a subset of parameters.  Linear
    layers fed 3-D inputs are uncovered because their per-example gradient is a sum over positions
    whose norm does not factorise; a Linear applied to a *reshaped* ``(B*T, F)`` input cannot be
    detected and would be treated as ``B*T`` examples.

    Why forward hooks + tensor hooks on the output rather than ``register_full_backward_hook``: full
    backward hooks wrap every call in an extra autograd Function even while measurement is disabled,
    fail on in-place ops on the output (``nn.ReLU(inplace=True)``), and warn on the first layer.  A
    tensor hook is only registered on steps that are measured, so a disabled instance costs one
    Python call per Linear forward.  Hooks never return a value, so ``.grad`` is unchanged.

    Cost on a measured step, per covered Linear (vectorised, no Python loop over examples, no device
    sync until results are read): ``O(B (in + out))`` for the per-example norms plus
    ``min(B in out, B^2 (in + out))`` for the batch-gradient norm; memory is ``B`` floats per layer plus
    a reference to the layer input, which autograd saves for the weight gradient anyway.

    Measurement lifecycle: each forward of the wrapped ``module`` (with grad enabled, while
    :attr:`enabled`) starts a new measurement; the following backward fills it in. After
    :meth:`begin_step`, the forwards up to the next ``begin_step`` are *passes* of one step instead
    (micro-batches whose gradients accumulate, each pass's loss weighted by its share of the step's
    rows): each pass's forward must follow the previous pass's backward, and the per-example norms
    of all passes make one measurement over the step's rows. The batch-gradient norm ``T`` then
    comes from ``.grad`` (:meth:`grad_stats_with`), which holds the accumulated step gradient.  Calling the wrapped
    module twice before one backward, reusing a Linear within one forward, or running backward twice
    through the same graph is detected and reported (uncovered layer, or an error from
    :meth:`grad_stats`) rather than silently mis-measured.  Gradient checkpointing re-runs forwards in
    backward and makes the affected layers uncovered.  Forwards under ``no_grad``, inside ``torch.func``
    transforms, and inside :func:`measurements_suspended` (:func:`microbatch_grad_stats` uses it) are ignored,
    so those fall-backs can be run on the uncovered parameters without clobbering the measurement
    (``S`` and ``T`` are sums over parameters, so the two parts add up).

    Examples:

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> with PerExampleGradNorms(net) as hooks:
    ...     nn.functional.cross_entropy(net(x), y).backward()
    ...     stats = hooks.grad_stats()
    >>> stats.n, stats.small_batch, hooks.per_example_sqr_norms().shape
    (8, 1, torch.Size([8]))
    >>> hooks.uncovered_parameter_names
    ()
    """

    def __init__(
        self,
        module: nn.Module,
        loss_reduction: Literal["mean", "sum"] = "mean",
        enabled: bool = True,
        batch_grad_from_hooks: bool = True,
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.module = module
        self.loss_reduction: Literal["mean", "sum"] = loss_reduction
        self.enabled = bool(enabled)
        #: False: skip the batch-gradient norm T in the hooks (it costs one more matmul per layer, as much
        #: as the weight gradient itself); the caller reads it from ``.grad`` and passes it to
        #: :meth:`grad_stats_with` (valid when ``.grad`` holds exactly this batch's mean gradient).
        self.batch_grad_from_hooks = bool(batch_grad_from_hooks)

        # First name under which each parameter appears (named_parameters de-duplicates shared ones).
        self._param_names: dict[int, str] = {id(p): name for name, p in module.named_parameters()}
        self._params: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
        # Which modules own each parameter: a Linear weight tied to e.g. an Embedding also receives that
        # module's gradient, so its per-example gradient is not just the Linear's outer product.
        owners: dict[int, set[int]] = {}
        for mod in module.modules():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(id(mod))

        self._linears: list[nn.Linear] = []
        self._static_reasons: dict[int, str] = {}  # param id -> why never coverable
        for mod in module.modules():
            if not isinstance(mod, nn.Linear):
                continue
            if type(mod).forward is not nn.Linear.forward:
                for p in mod.parameters(recurse=False):
                    self._static_reasons[id(p)] = f"{type(mod).__name__} overrides nn.Linear.forward"
                continue
            own = [t for t in (mod.weight, mod.bias) if t is not None]
            shared = [t for t in own if owners[id(t)] != {id(mod)}]
            for t in shared:
                self._static_reasons[id(t)] = "parameter is shared with another module"
            if len(shared) == 0:
                self._linears.append(mod)
            else:
                for t in own:
                    if id(t) not in self._static_reasons:
                        self._static_reasons[id(t)] = "another parameter of this Linear is shared"

        self._generation = 0
        self._records: dict[nn.Module, _LayerRecord] = {}
        self._step_mode = False  # begin_step() was called: forwards are passes of one step
        self._step_started = False  # the current step's first pass has begun
        self._passes = 0
        self._measured = False  # at least one measurement started
        self._invalid: str | None = None
        self._version = 0  # bumped whenever a hook changes a record (cache key of _coverage)
        self._coverage_cache: tuple[tuple[int, int, bool], tuple[list[nn.Module], dict[int, str]]] | None = (
            None
        )
        self._handles: list[Any] = [module.register_forward_pre_hook(self._start_measurement)]
        for mod in self._linears:
            self._handles.append(mod.register_forward_hook(self._forward_hook, with_kwargs=True))

    # ---- lifecycle -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove all hooks (idempotent).  A completed measurement stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._generation += 1  # tensor hooks already registered on live graphs become no-ops
        for rec in self._records.values():
            rec.input = None  # drop activation references

    def __enter__(self) -> PerExampleGradNorms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def reset(self) -> None:
        """Forget the current measurement (the next forward starts a new one anyway)."""
        self._generation += 1
        self._records = {}
        self._invalid = None
        self._measured = False
        self._passes = 0

    def begin_step(self) -> None:
        """The next forward starts a step's measurement; later forwards until the next call are its
        passes (micro-batches), measured together."""
        self._step_mode = True
        self._step_started = False

    # ---- hooks -------------------------------------------------------------------------------------
    def _start_measurement(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.enabled or _should_ignore_forward():
            return  # keep the previous measurement readable while disabled / during evaluation
        self._generation += 1  # hooks of an earlier pass's graph, should it run backward again, no-op
        if self._step_mode and self._step_started and self._measured:
            self._next_pass()
            return
        self._step_started = True
        self._records = {}
        self._invalid = None
        self._measured = True
        self._passes = 1

    def _next_pass(self) -> None:
        """Keep each layer's per-example norms of the pass that ended; reset its per-pass state."""
        self._version += 1
        self._passes += 1
        for rec in self._records.values():
            if rec.problem is not None:
                continue
            if rec.calls and rec.per_example is None:
                # The previous pass ran forward but no backward through this layer before this
                # forward: forwards interleaved, not passes.
                rec.problem = "a pass's forward ran before the previous pass's backward"
                continue
            if rec.per_example is not None:
                rec.earlier_passes.append(rec.per_example)
            rec.calls = rec.backward_calls = 0
            rec.input = rec.per_example = rec.batch_sqr = None

    def _forward_hook(
        self, mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self.enabled or not self._measured or _should_ignore_forward():
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        self._version += 1  # records change: cached coverage is stale
        rec = self._records.setdefault(mod, _LayerRecord())
        rec.calls += 1
        if rec.calls > 1:
            # Per-example gradient = sum over calls; the norm of a sum needs cross terms we don't have.
            rec.problem = "Linear called more than once in one forward (weight reuse / checkpointing)"
            rec.input = None
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or x.dim() != 2:
            ndim = x.dim() if isinstance(x, Tensor) else None
            rec.problem = f"Linear input has {ndim} dims; only 2-D (batch, features) inputs are supported"
            return
        if mod.weight.requires_grad:
            # Autograd already saves this input for the weight gradient, so keeping a reference costs no
            # extra memory; we only need it until this layer's backward.
            rec.input = x.detach()
            rec.input_version = x._version
        output.register_hook(partial(self._backward_hook, mod, self._generation))  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch's stubs

    def _backward_hook(self, mod: nn.Module, generation: int, grad: Tensor) -> None:
        if generation != self._generation:
            if self._handles and self._measured:
                # The graph reaches a forward from an earlier call of the wrapped module, so this
                # backward mixes several forwards: per-example norms would be wrong.
                self._invalid = "backward went through more than one forward call of the wrapped module"
                self._version += 1
            return
        rec = self._records.get(mod)
        if rec is None or rec.problem is not None:
            return
        self._version += 1
        rec.backward_calls += 1
        if rec.backward_calls > 1:
            rec.problem = "backward ran more than once through this layer (retain_graph?)"
            return
        with torch.no_grad():
            g = grad.detach()
            acc_dtype = torch.promote_types(g.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
            if g.dtype != acc_dtype:
                g = g.to(acc_dtype)
            batch = g.shape[0]
            # Hook rows are kept raw; per_example_sqr_norms rescales them to per-example gradients
            # (of the per-example losses) once the step's rows are known (a mean loss over R rows
            # gives rows g_i / R, whether in one pass or several). T is rescaled to the batch *mean*
            # gradient here, whatever the loss reduction.
            mean_scale = 1.0 if self.loss_reduction == "mean" else 1.0 / batch
            g_sqr = (g * g).sum(dim=1)
            weight_measured = weight_grad = mod.weight.requires_grad
            has_bias = isinstance(mod.bias, Tensor) and mod.bias.requires_grad
            if weight_grad:
                if rec.input is None:
                    weight_measured = False
                elif rec.input._version != rec.input_version:
                    rec.problem = "Linear input was modified in place after the forward"
                    rec.input = None
                    return
            # Per example: |a_i|²|g_i|² (weight) + |g_i|² (bias) = (|a_i|² + 1)|g_i|² -- one product.
            with_batch = self.batch_grad_from_hooks
            batch_sqr = g.new_zeros(())
            if weight_measured and rec.input is not None:
                a = rec.input if rec.input.dtype == acc_dtype else rec.input.to(acc_dtype)
                a_sqr = (a * a).sum(dim=1)
                per_example = (a_sqr + 1.0) * g_sqr if has_bias else a_sqr * g_sqr
                if with_batch:
                    batch_sqr = _linear_weight_grad_sqr_norm(a, g)
            elif has_bias:
                per_example = g_sqr
            else:
                per_example = torch.zeros_like(g_sqr)
            if has_bias and with_batch:
                g_sum = g.sum(dim=0)
                batch_sqr = batch_sqr + (g_sum * g_sum).sum()
            rec.per_example = per_example
            rec.batch_sqr = batch_sqr * mean_scale**2 if mean_scale != 1.0 else batch_sqr
            rec.input = None  # release the activation reference as soon as possible

    # ---- coverage ----------------------------------------------------------------------------------
    def _trainable(self) -> list[tuple[int, str]]:
        return [(pid, name) for pid, name in self._param_names.items() if self._params[pid].requires_grad]

    def _coverage(self) -> tuple[list[nn.Module], dict[int, str]]:
        """(good layers, {param id: reason}) for the current measurement (static before any).

        Cached until the hooks change a record: a step reads coverage several times (covered, uncovered,
        statistics), and walking the module tree each time costs more than the statistics."""
        key = (self._generation, self._version, self._measured)
        if self._coverage_cache is None or self._coverage_cache[0] != key:
            self._coverage_cache = (key, self._compute_coverage())
        return self._coverage_cache[1]

    def _compute_coverage(self) -> tuple[list[nn.Module], dict[int, str]]:
        reasons: dict[int, str] = dict(self._static_reasons)
        good: list[nn.Module] = []
        linear_ids = {id(m) for m in self._linears}
        for mod in self._linears:
            if self._measured:
                rec = self._records.get(mod)
                problem = (
                    "Linear forward was not called in the measured pass (e.g. weight used functionally, "
                    "as in nn.MultiheadAttention.out_proj)"
                    if rec is None
                    else rec.problem
                )
                if problem is not None:
                    for p in mod.parameters(recurse=False):
                        reasons[id(p)] = problem
                    continue
            good.append(mod)
        covered = {id(p) for m in good for p in m.parameters(recurse=False)}
        for other in self.module.modules():
            if id(other) in linear_ids:
                continue
            for p in other.parameters(recurse=False):
                if id(p) not in covered:
                    reasons.setdefault(
                        id(p), f"parameter of {type(other).__name__} (only nn.Linear is hooked)"
                    )
        return good, reasons

    @property
    def covered_parameter_names(self) -> tuple[str, ...]:
        """Trainable parameters whose per-example gradients are measured (as of the last measurement;
        before any measurement, those that are coverable in principle)."""
        _, reasons = self._coverage()
        return tuple(name for pid, name in self._trainable() if pid not in reasons)

    @property
    def uncovered_parameter_names(self) -> tuple[str, ...]:
        """Trainable parameters *not* included in the statistics (callers should fall back for them)."""
        _, reasons = self._coverage()
        return tuple(name for pid, name in self._trainable() if pid in reasons)

    @property
    def uncovered_reasons(self) -> dict[str, str]:
        """``{parameter name: why it is not covered}`` for :attr:`uncovered_parameter_names`."""
        _, reasons = self._coverage()
        return {name: reasons[pid] for pid, name in self._trainable() if pid in reasons}

    # ---- results -----------------------------------------------------------------------------------
    def _finished_records(self) -> list[_LayerRecord]:
        if not self._measured:
            raise RuntimeError("no measurement: run a forward (with measurement enabled) and backward first")
        if self._invalid is not None:
            raise RuntimeError(f"measurement is invalid: {self._invalid}")
        good, _ = self._coverage()
        recs = [self._records[m] for m in good if self._records[m].per_example is not None]
        if not recs:
            raise RuntimeError("no covered layer received a gradient: did backward run after the forward?")
        sizes = {tuple(int(t.shape[0]) for t in (*r.earlier_passes, r.per_example)) for r in recs}  # type: ignore[union-attr]
        if len(sizes) != 1:
            raise RuntimeError(f"covered Linear layers saw different batch sizes {sorted(sizes)}")
        return recs

    def _raw_per_example(self, rec: _LayerRecord) -> Tensor:
        assert rec.per_example is not None
        if not rec.earlier_passes:
            return rec.per_example
        return torch.cat([*rec.earlier_passes, rec.per_example])

    @property
    def batch_size(self) -> int | None:
        """Number of examples in the last completed measurement, or ``None``."""
        try:
            return int(self._raw_per_example(self._finished_records()[0]).shape[0])
        except RuntimeError:
            return None

    def per_example_sqr_norms(self) -> Tensor:
        """``(B,)`` squared norms of the per-example gradients (of the per-example losses) over the
        covered parameters.  Layers whose output did not reach the loss contribute zero, which is their
        exact gradient."""
        recs = self._finished_records()
        raw = torch.stack([self._raw_per_example(r) for r in recs]).sum(dim=0)
        rows = int(raw.shape[0])
        return raw * float(rows) ** 2 if self.loss_reduction == "mean" else raw

    def batch_grad_sqr_norm(self) -> float:
        """Squared norm of the batch-mean gradient over the covered parameters (``T``)."""
        if not self.batch_grad_from_hooks:
            raise RuntimeError(
                "batch_grad_from_hooks=False: T is not measured here; use grad_stats_with(T, n)"
            )
        recs = self._finished_records()
        if self._passes > 1:
            raise RuntimeError(
                "the step ran in several passes: T is the norm of their sum, not of one pass; read it "
                "from .grad and use grad_stats_with(T, n)"
            )
        return float(torch.stack([r.batch_sqr for r in recs]).sum())  # type: ignore[misc]

    def grad_stats_with(self, batch_grad_sqr_norm: float, n: int) -> GradNoiseStats:
        """The unbiased statistics from this measurement's per-example norms and an outside ``T``.

        ``T`` is the squared norm of the mean gradient (over the covered parameters) of ``n``
        examples that include this measurement's ``B``: e.g. ``sum(p.grad.norm()**2)`` read right
        after backward, where ``n = B`` on one device and the global batch under DDP (the
        all-reduced gradient). ``E[S] = |G|² + tr(Σ)`` does not depend on which examples the mean
        covers, so :func:`unbiased_grad_stats` applies with ``n`` and ``small_batch = 1``.
        """
        per_example = self.per_example_sqr_norms()
        if n < 2 or n < int(per_example.shape[0]):
            raise RuntimeError(f"n={n} must be at least 2 and at least this measurement's batch")
        return GradNoiseStats.from_norms(float(per_example.mean()), float(batch_grad_sqr_norm), n, 1)

    def grad_stats(self) -> GradNoiseStats:
        """``S``, ``T`` and the unbiased ``|G|^2``, ``tr(Sigma)`` estimates (``n = B``, ``small_batch = 1``).

        Needs ``batch_grad_from_hooks=True`` (the default); otherwise use :meth:`grad_stats_with`.

        Synchronises with the device once (two scalars), so call it only on measured steps.
        """
        per_example = self.per_example_sqr_norms()
        batch = int(per_example.shape[0])
        if batch < 2:
            raise RuntimeError("need a batch of at least 2 examples to estimate the gradient noise")
        return GradNoiseStats.from_norms(float(per_example.mean()), self.batch_grad_sqr_norm(), batch, 1)


# --------------------------------------------------------------------------------------------------
# Generic fall-backs: per-sample gradients with torch.func, and micro-batches
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
    if vectorize is None:
        vectorize = next(model.buffers(), None) is None
    if vectorize and params:
        return _vectorized_microbatch_stats(model, loss_fn, inputs, targets, n, params)
    names = list(params)
    tensors = [params[k] for k in names]
    saved_buffers = {k: v.detach().clone() for k, v in model.named_buffers()} if restore_buffers else None
    acc_dtype = torch.promote_types(tensors[0].dtype, torch.float32) if tensors else torch.float32
    # Accumulate on the device; a single host sync at the end.
    sqr_sum = torch.zeros((), dtype=acc_dtype, device=inputs.device)
    grad_sum = [torch.zeros_like(p, dtype=acc_dtype) for p in tensors]
    try:
        with torch.enable_grad(), measurements_suspended():
            for j in range(n):
                sl = slice(j * b, (j + 1) * b)
                loss = loss_fn(model(inputs[sl]), targets[sl])
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for acc, g in zip(grad_sum, grads, strict=True):
                    if g is None:  # parameter not used by this loss: its gradient is exactly zero
                        continue
                    g = g.detach().to(acc_dtype)
                    sqr_sum += g.pow(2).sum()
                    acc += g
    finally:
        if saved_buffers is not None:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(saved_buffers[k])
    big = float(sum((acc / n).pow(2).sum() for acc in grad_sum)) if grad_sum else 0.0
    return GradNoiseStats.from_norms(float(sqr_sum) / n, big, n, b)


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
    """One training step's unbiased ``(|G|², tr(Σ))`` for a whole network, without a Trainer.

    ``nn.Linear`` layers are measured exactly by :class:`PerExampleGradNorms` hooks; the other
    parameters (convolutions, norms) by :func:`microbatch_grad_stats` on the step's rows, when a
    ``loss_fn`` is given and on ``fallback`` steps only (a partial estimate of such a model would
    bias the EMAs, so other steps give None). The caller drives one step at a time:

    1. :meth:`begin_step` before the forward (whether to measure, the batch for micro-batches);
    2. :meth:`after_backward` right after the backward, before the optimizer moves the weights;
    3. :meth:`estimate` with the step's global rows; :attr:`last_estimate` keeps the value.

    ``grad_from_params``: read the batch gradient's squared norm from ``.grad`` (exact only when
    ``.grad`` holds this step's gradient alone: no gradient accumulation); else the hooks compute it.

    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Linear(3, 1)
    >>> meter = NoiseMeter(net)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> meter.begin_step(measure=True)
    >>> nn.functional.mse_loss(net(x), y).backward()
    >>> meter.after_backward()
    >>> grad_sqr, trace = meter.estimate(global_rows=16)
    >>> grad_sqr > 0 and trace > 0
    True
    >>> meter.remove()
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        grad_from_params: bool = True,
        fallback_microbatches: int = _Declared.fallback_microbatches,
    ) -> None:
        self.network = network
        self.loss_fn = loss_fn
        self.grad_from_params = grad_from_params
        self.fallback_microbatches = fallback_microbatches
        self.hooks = PerExampleGradNorms(
            network, loss_reduction="mean", enabled=False, batch_grad_from_hooks=not grad_from_params
        )
        self._params = dict(network.named_parameters())
        self._measuring = False
        self._grad_t: Tensor | None = None
        self._fallback_batch: tuple[Tensor, Tensor] | None = None
        self._fallback_stats: GradNoiseStats | None = None
        #: The last :meth:`estimate` (None: that step could not be measured).
        self.last_estimate: tuple[float, float] | None = None

    @property
    def uncovered_parameter_names(self) -> tuple[str, ...]:
        """Parameters outside ``nn.Linear`` layers (measured by micro-batches, if at all)."""
        return self.hooks.uncovered_parameter_names

    @property
    def measuring(self) -> bool:
        """Whether the current step is measured (set by :meth:`begin_step`)."""
        return self._measuring

    @property
    def needs_fallback(self) -> bool:
        """The network has parameters the hooks miss, and a loss to measure them with micro-batches."""
        return bool(self.uncovered_parameter_names) and self.loss_fn is not None

    def begin_step(self, measure: bool, batch: Any = None, fallback: bool = True) -> None:
        """Before the step's forward: measure it or not; ``batch`` ``(inputs, targets, ...)`` feeds the
        micro-batches on ``fallback`` steps."""
        self._measuring = measure
        self._grad_t = None
        self._fallback_stats = None
        self._fallback_batch = None
        self.hooks.enabled = measure
        if measure:
            self.hooks.begin_step()  # a step run as several passes (micro-batches) is one measurement
        if (
            measure
            and fallback
            and self.needs_fallback
            and isinstance(batch, (tuple, list))
            and len(batch) >= 2
        ):
            self._fallback_batch = (batch[0], batch[1])

    def after_backward(self) -> None:
        """Right after the backward, before clipping and the optimizer step (under DDP: after the
        gradient all-reduce, so ``.grad`` is the global mean)."""
        if self._fallback_batch is not None:
            # Once a step, even when an out-of-memory retry runs several backward passes; at the
            # parameters the per-example hooks saw.
            batch, self._fallback_batch = self._fallback_batch, None
            self._fallback_stats = self._microbatch_stats(*batch)
        if not (self._measuring and self.grad_from_params):
            return
        try:
            names = self.hooks.covered_parameter_names
        except RuntimeError:
            return
        grads = [g for g in (self._params[n].grad for n in names) if g is not None]
        if grads:
            self._grad_t = torch.stack(torch._foreach_norm(grads)).pow(2).sum()

    def estimate(self, global_rows: int) -> tuple[float, float] | None:
        """This step's ``(|G|², tr(Σ))``, or None when it can't be measured (also :attr:`last_estimate`).

        ``global_rows``: the rows of the step over all ranks (the mean gradient in ``.grad`` is theirs).
        """
        self.last_estimate = self._estimate(global_rows) if self._measuring else None
        return self.last_estimate

    def _estimate(self, global_rows: int) -> tuple[float, float] | None:
        covered = self.hooks.covered_parameter_names
        full_model = self.needs_fallback
        if full_model and self._fallback_stats is None:
            return None  # not a fallback step, or the micro-batches could not be measured
        if not full_model and not covered:
            return None  # nothing measurable in this network
        grad_sqr = trace = 0.0
        try:
            if covered:
                if self.grad_from_params:
                    if self._grad_t is None:
                        return None
                    stats = self.hooks.grad_stats_with(float(self._grad_t), n=global_rows)
                else:
                    stats = self.hooks.grad_stats()
                grad_sqr, trace = stats.grad_sqr, stats.trace_sigma
            if full_model:
                assert self._fallback_stats is not None
                # |G|² and tr(Σ) are sums over parameters: disjoint subsets add up.
                grad_sqr += self._fallback_stats.grad_sqr
                trace += self._fallback_stats.trace_sigma
        except (RuntimeError, ValueError):
            return None  # e.g. a 1-row tail batch, or an OOM-split step that ran several forwards
        return grad_sqr, trace

    def _microbatch_stats(self, x: Tensor, y: Tensor) -> GradNoiseStats | None:
        """Statistics of the parameters the hooks miss, from ``fallback_microbatches`` equal parts of
        the rows (a remainder is left out); None for a batch too small to split or out of memory."""
        parts = min(self.fallback_microbatches, len(x))
        if parts < 2 or self.loss_fn is None:
            return None
        usable = (len(x) // parts) * parts
        try:
            return microbatch_grad_stats(
                self.network,
                self.loss_fn,
                x[:usable],
                y[:usable],
                parts,
                param_names=self.uncovered_parameter_names,
            )
        except (RuntimeError, ValueError, MemoryError):
            return None

    def remove(self) -> None:
        """Take the hooks off the network."""
        self.hooks.remove()
