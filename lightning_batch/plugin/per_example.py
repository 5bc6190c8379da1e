"""Exact per-example gradient norms of the parameters an optimizer updates, whatever layers use them.

The gradient noise scale needs ``|g_i|²``, each example's gradient's squared norm, summed over the
parameters. Materialising ``g_i`` costs a copy of the model per example; for the layers real
models are made of, the norm has a closed form from what the step computes anyway: the layer's
input (kept by autograd) and the gradient at its output (seen by a hook). :class:`PerExampleNorms`
watches one training step through a ``TorchFunctionMode`` and applies, for each call of a
parameter, the rule of the function that used it:

- ``F.linear`` on inputs of any rank ``(batch, ..., features)``: with ``a_t``, ``g_t`` the input and
  output-gradient rows of one example, ``|Σ_t g_t a_tᵀ|² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` (the
  "ghost norm", Li et al. 2021), or the materialised ``Gᵀ A`` when that is cheaper (``T²`` against
  ``d_in·d_out``); the bias ``|Σ_t g_t|²``.
- ``F.embedding``: ``Σ_{t,t'} [i_t = i_t'] (g_t·g_t')``, tokens of ``padding_idx`` left out (torch
  gives that row no gradient); a lookup broadcast over the batch (position embeddings of shape
  ``(1, T)``) is measured at the elementwise add that spreads it over the examples.
- ``F.layer_norm``, ``F.group_norm``, ``F.batch_norm`` (the affine parameters): ``Σ g ⊙ x̂`` and ``Σ g``
  per example, ``x̂`` the normalised input (Gray et al. 2024 measure the noise scale of transformers
  from these alone). A batch norm in training mode normalises with the batch's statistics, which
  its per-example gradients hold fixed; but its backward couples the examples' gradients upstream,
  so every parameter used before it in the pass is left to the caller (:data:`COUPLED`): only the
  last such batch norm's affine parameters, and what follows it (a ResNet's head), are measured.
- ``F.conv1d`` and ``F.conv2d``: every example's weight gradient at once from one convolution
  backward with the examples as groups (Rochette et al. 2019) where that is no larger than the
  unfolded patches, else the linear rule on the unfolded patches (per group).
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): its in- and out-projections run
  as separate ``F.linear`` calls on the measured step (an identity where the function would
  project), so the linear rule sees them; the output is the same up to rounding.
- a parameter added elementwise to the batch's activations (``x + pos_embedding``): the add's
  output gradient, summed to the parameter's shape.

A parameter used several times in a step (a shared layer, a model run as several passes) is
measured over all its calls: calls on the same examples are concatenated along the tokens, passes
over other examples are other rows. A parameter also used by any other differentiable function, or
by two kinds of rule, is not measured exactly; :attr:`PerExampleNorms.reasons` says why, and the
caller measures it otherwise (micro-batches) or leaves it out, and says so.

The gradients are the loss's, a mean over the pass's examples: each example's row is scaled by
the step's number of examples, so the per-example gradients average to the batch's.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.LayerNorm(3))
    >>> norms = PerExampleNorms(dict(net.named_parameters()))
    >>> tokens = torch.randint(10, (5, 7))  # 5 examples of 7 tokens: 3-D inputs to the Linear
    >>> norms.start(rows=5)
    >>> loss = net(tokens).pow(2).mean()
    >>> norms.stop()
    >>> loss.backward()
    >>> result = norms.finish()
    >>> result.per_example.shape, sorted(result.exact) == sorted(n for n, _ in net.named_parameters())
    (torch.Size([5]), True)
"""

from __future__ import annotations

import inspect
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["COUPLED", "PerExampleNorms", "PerExampleResult", "measurements_suspended"]

#: Functions whose use of a parameter has a closed-form per-example norm (see the module docstring).
_ADD_FUNCS = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.add_}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MHA_PARAMS = (
    "in_proj_weight",
    "in_proj_bias",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "out_proj_weight",
    "out_proj_bias",
    "bias_k",
    "bias_v",
)


@dataclass
class PerExampleResult:
    """One measured step: the per-example squared gradient norms over the exactly measured parameters."""

    per_example: Tensor
    """``|g_i|²`` summed over :attr:`exact`, one per example of the step (float32 or float64)."""
    exact: tuple[str, ...]
    """The parameters measured exactly in this step."""
    reasons: dict[str, str]
    """The others, each with why it was not measured exactly."""


@dataclass
class _Site:
    """One call of a rule: what it saw in the forward, and the gradient at its output (in backward)."""

    kind: str  # "linear" | "embedding" | "norm" | "add"
    pass_index: int
    weight: str | None  # the parameter in the weight's role (its name), or None
    bias: str | None
    tensors: dict[str, Any] = field(default_factory=dict)
    grad: Tensor | None = None
    rows: slice | None = None  # a row block of the weight: MHA's packed in-projection
    bias_rows: slice | None = None  # a row block of the bias
    rows_of_examples: int = 0  # the examples this call saw (its batch dimension's size)


#: Why a parameter used before a batch norm in training mode is not measured per example: the batch
#: norm's backward couples the examples (each example's gradient upstream holds the batch's mean
#: gradient), so per-example norms of those parameters misstate the noise badly (a ResNet's |G|²
#: came out 5x low and tr(Σ) 5x high against micro-batches and the full data's gradient). Micro-batches,
#: each normalised with its own statistics, measure them instead.
COUPLED = "used before a batch norm in training mode, whose batch statistics couple the examples' gradients"

_suspension = threading.local()


@contextmanager
def measurements_suspended() -> Iterator[None]:
    """Forwards run inside are not measured by any :class:`PerExampleNorms` (the micro-batch fall-back's
    own passes, run while a step is watched, must not be taken for the step's)."""
    _suspension.depth = getattr(_suspension, "depth", 0) + 1
    try:
        yield
    finally:
        _suspension.depth -= 1


def _ignored() -> bool:
    """Not a training step's forward: suspended, or inside a ``torch.func`` transform (which sees one
    example at a time, in batched tensors)."""
    if getattr(_suspension, "depth", 0) > 0:
        return True
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


class _Recorder(TorchFunctionMode):
    """The ``TorchFunctionMode`` a measured step's forward runs under (see :class:`PerExampleNorms`)."""

    def __init__(self, owner: PerExampleNorms) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        owner = self.owner
        if owner._suspended or not torch.is_grad_enabled() or _ignored():
            return func(*args, **kwargs)
        handler = _HANDLERS.get(func)
        if handler is not None:
            handled = handler(owner, func, args, kwargs)
            if handled is not _PASS:
                return handled
        result = func(*args, **kwargs)
        owner._note_other_use(func, args, kwargs, result)
        return result


#: A handler's answer for "not mine after all: run the function as it is".
_PASS = object()


class PerExampleNorms:
    """Watches one training step at a time and returns each example's squared gradient norm.

    Args:
        params: the parameters to measure, by name (those the optimizers update).
        modules: the modules the parameters live in: transformer layers built with
            ``batch_first=False`` are found there, whose activations carry the batch in dimension 1.

    The caller, once a measured step:

    1. :meth:`start` before the forward, with the step's number of examples (with gradient
       accumulation, the first pass's, and :meth:`resume` before each further pass);
    2. :meth:`stop` after the backward (before the optimizer step: its updates are not uses);
    3. :meth:`finish` for the :class:`PerExampleResult` (None when nothing could be measured).
    """

    def __init__(self, params: Mapping[str, nn.Parameter], modules: Iterable[nn.Module] = ()) -> None:
        self.params = {name: p for name, p in params.items() if p.requires_grad}
        self._name_of = {id(p): name for name, p in self.params.items()}
        self._recorder = _Recorder(self)
        self._active = False
        self._suspended = False
        self._sites: list[_Site] = []
        self._outside: dict[str, str] = {}
        self._pass = 0
        self._backward_seen = False
        self._rows = 0
        self._broadcast: dict[
            int, _Site
        ] = {}  # id(lookup output) -> its embedding site, until an add spreads it
        self._seq_first = 0  # depth of batch_first=False transformer layers being run
        #: (pass, number of sites so far) at each batch norm that used the batch's statistics
        self._coupling: list[tuple[int, int]] = []
        self._hooks = [
            handle
            for module in modules
            if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
            and not module.self_attn.batch_first
            for handle in (
                module.register_forward_pre_hook(self._enter_seq_first),
                module.register_forward_hook(self._leave_seq_first),
            )
        ]
        self._identities: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        #: Why each parameter the last finished step did not measure exactly was not (also when
        #: :meth:`finish` returned None).
        self.reasons: dict[str, str] = {}

    # -- the step ---------------------------------------------------------------------------------

    def start(self, rows: int) -> None:
        """A measured step begins: ``rows`` examples (this rank's)."""
        self.stop()
        self._sites, self._outside, self._broadcast, self._coupling = [], {}, {}, []
        self._pass, self._backward_seen, self._rows = 0, False, rows
        self._recorder.__enter__()  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch
        self._active = True

    def resume(self, rows: int) -> None:
        """Another pass of the same step (a gradient-accumulation micro-batch): ``rows`` more examples.

        The step's sites are kept: each pass's examples are told apart as a manual module's passes
        are, and :meth:`finish` returns the whole step's per-example norms.
        """
        self.stop()
        self._rows += rows
        self._recorder.__enter__()  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch
        self._active = True

    def stop(self) -> None:
        """Stop watching (idempotent; also after an exception)."""
        if self._active:
            self._active = False
            self._recorder.__exit__(None, None, None)  # type: ignore[no-untyped-call, unused-ignore]

    @property
    def active(self) -> bool:
        return self._active

    def remove(self) -> None:
        """Stop watching and take the module hooks off."""
        self.stop()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Functions run inside are not watched (the caller's own computations during a step)."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    def finish(self, weights: Mapping[str, Tensor] | None = None) -> PerExampleResult | None:
        """The step's per-example squared norms over the parameters measured exactly; a parameter in
        ``weights`` (a tensor of its shape) contributes ``Σ weight · g_i²`` instead of ``|g_i|²``."""
        self.stop()
        with torch.no_grad(), self.suspended():
            return self._finish(weights or {})

    # -- recording --------------------------------------------------------------------------------

    def _enter_seq_first(self, module: nn.Module, args: Any) -> None:
        self._seq_first += 1

    def _leave_seq_first(self, module: nn.Module, args: Any, output: Any) -> None:
        self._seq_first -= 1

    def _name(self, tensor: Any) -> str | None:
        return self._name_of.get(id(tensor)) if isinstance(tensor, Tensor) else None

    def _new_site(self, kind: str, weight: str | None, bias: str | None, batch_rows: int) -> _Site:
        if self._backward_seen:  # a forward after a backward: another pass of the step
            self._pass += 1
            self._backward_seen = False
        site = _Site(kind, self._pass, weight, bias, rows_of_examples=batch_rows)
        self._sites.append(site)
        return site

    def _batch_statistics_used(self) -> None:
        """A batch norm normalised with the batch's own statistics: every site before it in the pass
        gets a gradient that mixes the examples (see :data:`COUPLED`)."""
        this_pass = self._pass + 1 if self._backward_seen and self._sites else self._pass
        self._coupling.append((this_pass, len(self._sites)))

    def _identity(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An identity matrix (cached): the projection MHA's function applies where ours already did."""
        key = (size, dtype, device)
        if key not in self._identities:
            self._identities[key] = torch.eye(size, dtype=dtype, device=device)
        return self._identities[key]

    def _not_exact(self, name: str | None, why: str) -> None:
        if name is not None:
            self._outside.setdefault(name, why)

    def _note_other_use(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """A differentiable use of a measured parameter by a function without a rule: not exact."""
        if not _requires_grad(result):
            return
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                name = self._name(item)
                if name is not None:
                    self._not_exact(
                        name, f"used by {getattr(func, '__name__', func)!s}, which has no per-example rule"
                    )
                elif isinstance(item, Tensor) and id(item) in self._broadcast:
                    site = self._broadcast.pop(id(item))
                    self._not_exact(site.weight, "a lookup broadcast over the batch and not added to it")

    def _batch_dim(self, tensor: Tensor) -> int:
        """Where an activation keeps its examples: dimension 0, unless it is run inside a transformer layer
        built ``batch_first=False``, or only its dimension 1 has the step's number of examples."""
        if tensor.dim() < 3:
            return 0
        if self._seq_first:
            return 1
        return 1 if tensor.shape[0] != self._rows and tensor.shape[1] == self._rows else 0

    def _to_batch_first(self, tensor: Tensor, dim: int) -> Tensor:
        return tensor if dim == 0 else tensor.movedim(dim, 0)

    # -- the step's norms -------------------------------------------------------------------------

    def _finish(self, weights: Mapping[str, Tensor]) -> PerExampleResult | None:
        reasons = dict(self._outside)
        for site in self._broadcast.values():
            if site.weight is not None:
                reasons.setdefault(site.weight, "a lookup broadcast over the batch and not added to it")
        for index, site in enumerate(self._sites):
            if any(p == site.pass_index and index < position for p, position in self._coupling):
                for name in (site.weight, site.bias):
                    if name is not None:
                        reasons.setdefault(name, COUPLED)
        uses: dict[str, list[tuple[_Site, str]]] = defaultdict(list)
        for site in self._sites:
            for role, name in (("weight", site.weight), ("bias", site.bias)):
                if name is not None:
                    uses[name].append((site, role))
        passes = sorted({site.pass_index for site in self._sites})
        # A pass's examples: what most of its calls saw (a call that disagrees was read along the wrong
        # dimension, and its parameters are not measured exactly).
        rows = {
            p: Counter(s.rows_of_examples for s in self._sites if s.pass_index == p).most_common(1)[0][0]
            for p in passes
        }
        if passes and sum(rows.values()) != self._rows:
            # Forwards on parts of the batch before one backward (or on more rows than it has): which
            # call saw which examples cannot be told.
            why = f"the step's forwards saw {sum(rows.values())} examples per pass, not the batch's {self._rows}"
            self.reasons = {name: reasons.get(name, why) for name in self.params}
            return None
        totals: dict[int, Tensor] = {}
        measured: list[str] = []
        for name, sites in uses.items():
            if name in reasons:
                continue
            kinds = {site.kind for site, _ in sites}
            if len(kinds) > 1:
                reasons[name] = f"used by {' and '.join(sorted(kinds))} rules in one step"
                continue
            try:
                weight = weights.get(name)
                per_pass = {
                    p: self._norms([(s, r) for s, r in sites if s.pass_index == p], rows[p], weight)
                    for p in passes
                }
            except _NotExact as why:
                reasons[name] = str(why)
                continue
            for p, values in per_pass.items():
                if values is not None:
                    totals[p] = values if p not in totals else totals[p] + values
            measured.append(name)
        self.reasons = reasons
        if not measured:
            return None  # nothing this step used was measured exactly
        # Not used in this step at all: its per-example gradients are zero, measured as such.
        unused = [n for n in self.params if n not in uses and n not in reasons]
        scale = float(sum(rows.values()))  # the loss is a mean over the step's examples
        per_example = torch.cat([totals.get(p, torch.zeros(rows[p], dtype=torch.float64)) for p in passes])
        return PerExampleResult(per_example * scale**2, tuple(sorted(measured + unused)), reasons)

    def _norms(
        self, sites: list[tuple[_Site, str]], rows: int, weight: Tensor | None = None
    ) -> Tensor | None:
        """``|g_i|²`` of one parameter over one pass's calls (None: not used in that pass); with a
        ``weight`` of the parameter's shape, ``Σ weight · g_i²`` (a diagonal preconditioner's norm)."""
        if not sites:
            return None
        live = [(s, r) for s, r in sites if s.grad is not None]
        for site, _ in live:
            if site.rows_of_examples != rows:
                raise _NotExact(
                    f"a call saw {site.rows_of_examples} examples where the step's others saw {rows}: its batch "
                    "dimension could not be told"
                )
        if not live:
            return torch.zeros(rows, dtype=torch.float64)
        kind = live[0][0].kind
        blocks: dict[tuple[int, int] | None, list[tuple[_Site, str]]] = defaultdict(list)
        for site, role in live:
            span = site.rows if role == "weight" else site.bias_rows
            blocks[None if span is None else (span.start, span.stop)].append((site, role))
        out = torch.zeros(rows, dtype=torch.float64, device=live[0][0].tensors["grad"].device)
        for rows_of_block, uses in blocks.items():  # a packed weight's row blocks are disjoint: norms add
            roles = {role for _, role in uses}
            if len(roles) > 1:
                raise _NotExact("used as a weight and as a bias in one step")
            role = roles.pop()
            block = weight
            if weight is not None and rows_of_block is not None:
                block = weight[rows_of_block[0] : rows_of_block[1]]
            out += _RULES[kind](role, [site for site, _ in uses], block).to(torch.float64)
        return out


class _NotExact(Exception):
    """Why one parameter's per-example norms cannot be had exactly in this step."""


def _requires_grad(result: Any) -> bool:
    if isinstance(result, Tensor):
        return result.requires_grad
    if isinstance(result, (list, tuple)):
        return any(isinstance(r, Tensor) and r.requires_grad for r in result)
    return False


def _acc(tensor: Tensor) -> Tensor:
    """The accumulation dtype: float16/bfloat16 sums in float32; float64 stays."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


# -- the rules' per-example norms -------------------------------------------------------------------


def _tokens(site: _Site, name: str) -> Tensor:
    """A site's tensor as (examples, tokens, features), the batch first."""
    tensor: Tensor = site.tensors[name]
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def _joined(tensors: list[Tensor]) -> Tensor:
    """Calls on the same examples, one after the other along the tokens (no copy for one call)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def _weighted(squares: Tensor, weight: Tensor | None) -> Tensor:
    """Per-example ``Σ weight · g²`` from squares ``(B, *parameter)`` (plain ``Σ g²`` without a weight)."""
    if weight is not None:
        squares = squares * weight.to(squares.dtype)
    return squares.reshape(squares.shape[0], -1).sum(dim=1)


def _linear_norms(role: str, sites: list[_Site], weight: Tensor | None = None) -> Tensor:
    grads = _joined([_acc(_tokens(s, "grad")) for s in sites])  # (B, T, d_out)
    if role == "bias":
        return _weighted(grads.sum(dim=1).pow(2), weight)
    inputs = _joined([_acc(_tokens(s, "input")) for s in sites])  # (B, T, d_in)
    tokens, d_in, d_out = inputs.shape[1], inputs.shape[2], grads.shape[2]
    if weight is not None:
        if tokens == 1:  # each example's gradient is an outer product: Σ_jk w_jk δ_j² a_k²
            return ((grads[:, 0].pow(2) @ weight.to(grads.dtype)) * inputs[:, 0].pow(2)).sum(dim=1)
        # No Gram-matrix shortcut takes a weight: each example's d_out x d_in gradient, held.
        return _weighted(torch.bmm(grads.transpose(1, 2), inputs).pow(2), weight)
    if tokens == 1:
        return inputs[:, 0].pow(2).sum(dim=1) * grads[:, 0].pow(2).sum(dim=1)
    if tokens * tokens <= d_in * d_out:  # the ghost norm: two (B, T, T) Gram matrices
        return (torch.bmm(inputs, inputs.transpose(1, 2)) * torch.bmm(grads, grads.transpose(1, 2))).sum(
            dim=(1, 2)
        )
    return (
        torch.bmm(grads.transpose(1, 2), inputs).pow(2).sum(dim=(1, 2))
    )  # each example's d_out x d_in gradient


def _embedding_norms(role: str, sites: list[_Site], weight: Tensor | None = None) -> Tensor:
    examples = sites[0].tensors["grad"].shape[0]
    keys, vectors, owners = [], [], []
    for site in sites:
        ids = site.tensors["ids"].reshape(site.tensors["ids"].shape[0], -1)
        grad = _acc(site.tensors["grad"]).reshape(examples, ids.shape[1], -1)
        ids = ids.expand(examples, -1)  # a broadcast lookup: every example used the same rows
        keep = torch.ones_like(ids, dtype=torch.bool)
        if site.tensors["padding_idx"] is not None:
            keep = ids != site.tensors["padding_idx"]
        example = torch.arange(examples, device=ids.device)[:, None].expand_as(ids)
        keys.append((example * site.tensors["num_embeddings"] + ids)[keep])
        vectors.append(grad[keep])
        owners.append(example[keep])
    key, vector, owner = torch.cat(keys), torch.cat(vectors), torch.cat(owners)
    unique, inverse = torch.unique(key, return_inverse=True)
    summed = torch.zeros(len(unique), vector.shape[1], dtype=vector.dtype, device=vector.device).index_add_(
        0, inverse, vector
    )
    row_owner = torch.zeros(len(unique), dtype=torch.long, device=key.device).index_copy_(0, inverse, owner)
    squares = summed.pow(2)
    if weight is not None:  # the weight of each (example, row)'s embedding row
        squares = squares * weight.to(squares.dtype)[unique % sites[0].tensors["num_embeddings"]]
    return torch.zeros(examples, dtype=vector.dtype, device=vector.device).index_add_(
        0, row_owner, squares.sum(dim=1)
    )


def _summed_norms(role: str, sites: list[_Site], weight: Tensor | None = None) -> Tensor:
    """Rules whose per-example gradient is small enough to hold: norms' and adds' (B, *parameter)."""
    total: Tensor | None = None
    for site in sites:
        per_example = site.tensors[f"per_example_{role}"](site)
        total = per_example if total is None else total + per_example
    assert total is not None
    if weight is not None:
        return _weighted(total.reshape(total.shape[0], *weight.shape).pow(2), weight)
    return total.reshape(total.shape[0], -1).pow(2).sum(dim=1)


_RULES: dict[str, Callable[[str, list[_Site], Tensor | None], Tensor]] = {
    "linear": _linear_norms,
    "embedding": _embedding_norms,
    "norm": _summed_norms,
    "add": _summed_norms,
}


# -- the handlers: what each function's call records ------------------------------------------------


def _linear(
    owner: PerExampleNorms, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    bound = _bind(("input", "weight", "bias"), args, kwargs)
    weight, bias = owner._name(bound.get("weight")), owner._name(bound.get("bias"))
    if weight is None and bias is None:
        return _PASS
    x: Tensor = bound["input"]
    out = func(*args, **kwargs)
    if x.dim() < 2:
        owner._not_exact(weight, "a linear layer on an input without a batch dimension")
        owner._not_exact(bias, "a linear layer on an input without a batch dimension")
        return out
    dim = owner._batch_dim(x)
    site = owner._new_site("linear", weight, bias, x.shape[dim])
    site.tensors["input"] = owner._to_batch_first(x.detach(), dim)
    _record_grad(owner, site, out, dim)
    return out


def _record_grad(owner: PerExampleNorms, site: _Site, out: Tensor, dim: int) -> None:
    """The site's output gradient, batch first, into ``site.tensors['grad']`` when backward reaches it."""

    def keep(grad: Tensor) -> None:
        owner._backward_seen = True
        grad = owner._to_batch_first(grad.detach(), dim)
        previous = site.tensors.get("grad")
        site.tensors["grad"] = grad if previous is None else previous + grad
        site.grad = site.tensors["grad"]

    if out.requires_grad:
        out.register_hook(keep)  # type: ignore[no-untyped-call, unused-ignore]


def _embedding(
    owner: PerExampleNorms, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    bound = _bind(
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        args,
        kwargs,
    )
    weight = owner._name(bound.get("weight"))
    if weight is None:
        return _PASS
    out = func(*args, **kwargs)
    ids: Tensor = bound["input"]
    if bound.get("max_norm") is not None or bound.get("scale_grad_by_freq") or ids.dim() < 1:
        owner._not_exact(weight, "an embedding with max_norm or scale_grad_by_freq")
        return out
    padding_idx = bound.get("padding_idx")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += bound["weight"].shape[0]
    dim = owner._batch_dim(out) if ids.dim() >= 2 else 0
    site = owner._new_site("embedding", weight, None, ids.shape[dim])
    site.tensors.update(
        ids=owner._to_batch_first(ids, dim) if ids.dim() >= 2 else ids[:, None],
        padding_idx=padding_idx,
        num_embeddings=bound["weight"].shape[0],
    )
    if ids.dim() >= 2 and ids.shape[dim] == 1 and owner._rows > 1:
        owner._broadcast[id(out)] = site  # one lookup for every example: measured at the add that spreads it
        site.rows_of_examples = owner._rows
        return out
    _record_grad(owner, site, out, dim)
    return out


def _add(
    owner: PerExampleNorms, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if len(args) < 2 or kwargs.get("alpha", 1) != 1:
        return _PASS
    left, right = args[0], args[1]
    broadcast = [t for t in (left, right) if isinstance(t, Tensor) and id(t) in owner._broadcast]
    param = next((t for t in (left, right) if owner._name(t) is not None), None)
    if not broadcast and param is None:
        return _PASS
    other = right if (broadcast and left is broadcast[0]) or left is param else left
    out = func(*args, **kwargs)
    if not isinstance(other, Tensor) or other.dim() == 0:
        if param is not None:
            owner._not_exact(owner._name(param), "added to a number, not to the batch's activations")
        return out
    dim = owner._batch_dim(other)
    batch_rows = other.shape[dim]
    if broadcast:  # a position-embedding lookup, spread over the examples here
        site = owner._broadcast.pop(id(broadcast[0]))
        site.rows_of_examples = batch_rows
        _record_grad(owner, site, out, dim)
        return out
    assert param is not None
    name = owner._name(param)
    if param.dim() > other.dim() or (param.dim() == other.dim() and param.shape[dim] != 1):
        owner._not_exact(name, "added elementwise without being broadcast over the batch")
        return out
    site = owner._new_site("add", name, None, batch_rows)
    shape = param.shape

    def per_example(site: _Site) -> Tensor:
        grad = _acc(site.tensors["grad"])  # (B, *activation)
        # Sum the dimensions the parameter was broadcast over, keeping the batch: the parameter's shape.
        lead = grad.dim() - 1 - len(shape) if param.dim() < other.dim() else 0
        if lead > 0:
            grad = grad.sum(dim=tuple(range(1, 1 + lead)))
        aligned = shape[1:] if param.dim() == other.dim() else shape
        dims = tuple(1 + i for i, size in enumerate(aligned) if size == 1 and grad.shape[1 + i] != 1)
        return grad.sum(dim=dims, keepdim=True) if dims else grad

    site.tensors["per_example_weight"] = per_example
    _record_grad(owner, site, out, dim)
    return out


def _norm_layer(
    kind: str,
    owner: PerExampleNorms,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``layer_norm``, ``group_norm``, ``batch_norm``: the affine parameters' per-example gradients."""
    names = {
        "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
        "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
        "batch_norm": (
            "input",
            "running_mean",
            "running_var",
            "weight",
            "bias",
            "training",
            "momentum",
            "eps",
        ),
    }[kind]
    bound = _bind(names, args, kwargs)
    if kind == "batch_norm" and (bound.get("training") or bound.get("running_mean") is None):
        owner._batch_statistics_used()
    weight, bias = owner._name(bound.get("weight")), owner._name(bound.get("bias"))
    if weight is None and bias is None:
        return _PASS
    out = func(*args, **kwargs)
    x: Tensor = bound["input"]
    dim = owner._batch_dim(x) if kind == "layer_norm" else 0
    site = owner._new_site("norm", weight, bias, x.shape[dim])
    eps = float(bound.get("eps", 1e-5) if bound.get("eps") is not None else 1e-5)
    x_first = owner._to_batch_first(x.detach(), dim)
    if kind == "layer_norm":
        shape = tuple(bound["normalized_shape"])
        keep = len(shape)

        def normalised() -> Tensor:
            return F.layer_norm(_acc(x_first), shape, None, None, eps)
    elif kind == "group_norm":
        groups = int(bound["num_groups"])
        keep = 1

        def normalised() -> Tensor:
            return F.group_norm(_acc(x_first), groups, None, None, eps)
    else:
        training = bool(bound.get("training", False))
        mean, var = bound.get("running_mean"), bound.get("running_var")
        keep = 1

        def normalised() -> Tensor:
            if training or mean is None or var is None:  # the batch's statistics, as the forward used them
                return F.batch_norm(_acc(x_first), None, None, None, None, True, 0.0, eps)
            return F.batch_norm(_acc(x_first), _acc(mean), _acc(var), None, None, False, 0.0, eps)

    def per_example(role: str, site: _Site) -> Tensor:
        grad = _acc(site.tensors["grad"])
        term = grad * normalised() if role == "weight" else grad
        if kind == "layer_norm":  # the normalised dimensions are the last ones
            return term.sum(dim=tuple(range(1, term.dim() - keep))) if term.dim() - keep > 1 else term
        return term.sum(dim=tuple(range(2, term.dim()))) if term.dim() > 2 else term  # per channel

    site.tensors["per_example_weight"] = partial(per_example, "weight")
    site.tensors["per_example_bias"] = partial(per_example, "bias")
    _record_grad(owner, site, out, dim)
    return out


def _conv(
    spatial: int,
    owner: PerExampleNorms,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    bound = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs)
    weight, bias = owner._name(bound.get("weight")), owner._name(bound.get("bias"))
    if weight is None and bias is None:
        return _PASS
    out = func(*args, **kwargs)
    x: Tensor = bound["input"]
    w: Tensor = bound["weight"]
    padding = bound.get("padding", 0)
    if x.dim() != spatial + 2 or isinstance(padding, str) and padding != "valid":
        owner._not_exact(weight, "a convolution with string padding or an unbatched input")
        owner._not_exact(bias, "a convolution with string padding or an unbatched input")
        return out
    groups = int(bound.get("groups", 1) or 1)
    pair = partial(_ntuple, spatial)
    stride, dilation = pair(bound.get("stride", 1)), pair(bound.get("dilation", 1))
    pad = pair(0 if padding == "valid" else padding)
    kernel = tuple(w.shape[2:])
    site = owner._new_site("linear", weight, bias, x.shape[0])
    x_detached = x.detach()

    def patches() -> Tensor:
        image = x_detached if spatial == 2 else x_detached.unsqueeze(2)
        k = kernel if spatial == 2 else (1, *kernel)
        d, p, s = (dilation, pad, stride) if spatial == 2 else ((1, *dilation), (0, *pad), (1, *stride))
        cols = F.unfold(image, k, dilation=d, padding=p, stride=s)  # (B, C_in k, L)
        return cols.transpose(1, 2)  # (B, L, C_in k)

    def per_example_weight_grads(grad: Tensor) -> Tensor:
        """Every example's weight gradient at once: one convolution backward with the examples as
        groups (Rochette et al. 2019), (B, *weight shape)."""
        examples, channels = x_detached.shape[:2]
        weight_grad: Tensor = _CONV_WEIGHT_GRAD[spatial](
            _acc(x_detached).reshape(1, examples * channels, *x_detached.shape[2:]),
            (examples * w.shape[0], *w.shape[1:]),
            _acc(grad).reshape(1, -1, *grad.shape[2:]),
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=examples * groups,
        )
        return weight_grad.reshape(examples, *w.shape)

    site.tensors.update(patches=patches, groups=groups, grouped=per_example_weight_grads)

    def keep(grad: Tensor) -> None:
        owner._backward_seen = True
        previous = site.tensors.get("grad")
        site.tensors["grad"] = grad.detach() if previous is None else previous + grad.detach()
        site.grad = site.tensors["grad"]

    if out.requires_grad:
        out.register_hook(keep)  # type: ignore[no-untyped-call, unused-ignore]
    site.kind = "conv"
    return out


def _conv_norms(role: str, sites: list[_Site], weight: Tensor | None = None) -> Tensor:
    """A convolution's weight: where each example's gradient is no larger than its unfolded patches,
    all of them from one grouped convolution backward; else the linear rule on each group's patches
    (groups own disjoint weight rows)."""
    total: Tensor | None = None
    for site in sites:
        groups = site.tensors["groups"]
        raw: Tensor = site.tensors["grad"]  # (B, C_out, *positions)
        grads = _acc(raw.flatten(2).transpose(1, 2))  # (B, L, C_out)
        if role == "bias":
            part = _weighted(grads.sum(dim=1).pow(2), weight)
        elif raw.shape[1] <= grads.shape[1]:  # C_out <= L: the weight gradient is the smaller tensor
            per_example = site.tensors["grouped"](raw)
            part = _weighted(per_example.reshape(per_example.shape[0], -1).pow(2), _flat(weight))
        else:
            cols = _acc(site.tensors["patches"]())
            part = torch.zeros(grads.shape[0], dtype=grads.dtype, device=grads.device)
            # A group's weight rows, each row (C_in/groups, *kernel) in the patches' order.
            blocks = [None] * groups if weight is None else weight.reshape(weight.shape[0], -1).chunk(groups)
            for g_in, g_out, block in zip(
                cols.chunk(groups, dim=2), grads.chunk(groups, dim=2), blocks, strict=True
            ):
                fake = _Site("linear", 0, None, None, {"input": g_in, "grad": g_out})
                part = part + _linear_norms("weight", [fake], block)
        total = part if total is None else total + part
    if len(sites) > 1:
        raise _NotExact("a convolution called more than once in a pass")
    assert total is not None
    return total


def _flat(weight: Tensor | None) -> Tensor | None:
    return None if weight is None else weight.reshape(-1)


_RULES["conv"] = _conv_norms
#: The weight gradient of a convolution (torch.nn.grad: a public module the package stubs leave out).
_CONV_WEIGHT_GRAD: dict[int, Callable[..., Tensor]] = {
    1: torch.nn.grad.conv1d_weight,  # type: ignore[attr-defined]
    2: torch.nn.grad.conv2d_weight,  # type: ignore[attr-defined]
}


def _mha(
    owner: PerExampleNorms, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``nn.MultiheadAttention``'s function, its projections run as ``F.linear`` calls the rules see."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
    names = {key: owner._name(bound.get(key)) for key in _MHA_PARAMS}
    if not any(names.values()):
        return _PASS
    query, key, value = bound["query"], bound["key"], bound["value"]
    unsupported = bound.get("bias_k") is not None or bound.get("static_k") is not None or query.dim() != 3
    if unsupported:
        for name in names.values():
            owner._not_exact(name, "multi-head attention with add_bias_kv, static keys or unbatched inputs")
        return func(*args, **kwargs)
    embed = query.shape[-1]
    weights: list[tuple[Tensor, slice | None]]
    if bound.get("use_separate_proj_weight", False):
        weights = [
            (bound["q_proj_weight"], None),
            (bound["k_proj_weight"], None),
            (bound["v_proj_weight"], None),
        ]
        names_w = [names["q_proj_weight"], names["k_proj_weight"], names["v_proj_weight"]]
    else:
        packed = bound["in_proj_weight"]
        weights = [(packed[i * embed : (i + 1) * embed], slice(i * embed, (i + 1) * embed)) for i in range(3)]
        names_w = [names["in_proj_weight"]] * 3
    packed_bias = bound.get("in_proj_bias")
    projected = []
    for (w, rows), name, x, i in zip(weights, names_w, (query, key, value), range(3), strict=True):
        b = packed_bias[i * embed : (i + 1) * embed] if packed_bias is not None else None
        bias_rows = slice(i * embed, (i + 1) * embed)
        projected.append(
            _measured_linear(owner, x, w, b, name, names["in_proj_bias"], rows, bias_rows, dim=1)
        )
    eye = owner._identity(embed, query.dtype, query.device)
    call = dict(bound)
    call.update(
        query=projected[0],
        key=projected[1],
        value=projected[2],
        in_proj_weight=None,
        in_proj_bias=None,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        out_proj_weight=eye,
        out_proj_bias=None,
    )
    attended, attention = func(**call)
    out = _measured_linear(
        owner,
        attended,
        bound["out_proj_weight"],
        bound["out_proj_bias"],
        names["out_proj_weight"],
        names["out_proj_bias"],
        None,
        None,
        dim=1,
    )
    return out, attention


def _measured_linear(
    owner: PerExampleNorms,
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    weight: str | None,
    bias: str | None,
    rows: slice | None,
    bias_rows: slice | None,
    dim: int,
) -> Tensor:
    out = F.linear(x, w, b)
    site = owner._new_site("linear", weight, bias if b is not None else None, x.shape[dim])
    site.rows, site.bias_rows = rows, bias_rows
    site.tensors["input"] = owner._to_batch_first(x.detach(), dim)
    _record_grad(owner, site, out, dim)
    return out


def _bind(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    return bound


def _ntuple(n: int, value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),) * n


_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.linear: _linear,
    F.embedding: _embedding,
    # partial, not a closure made at import: the handlers' code runs (and is mutation-tested) per call
    F.layer_norm: partial(_norm_layer, "layer_norm"),
    F.group_norm: partial(_norm_layer, "group_norm"),
    F.batch_norm: partial(_norm_layer, "batch_norm"),
    F.conv1d: partial(_conv, 1),
    F.conv2d: partial(_conv, 2),
    F.multi_head_attention_forward: _mha,
    **{func: _add for func in _ADD_FUNCS},
}
