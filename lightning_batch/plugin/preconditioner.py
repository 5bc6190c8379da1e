"""The diagonal preconditioner an adaptive optimizer applies now, read from its state.

Adam steps along ``m̂ / (√v̂ + ε)``, not along the gradient, so the gradient noise that matters to
its step is the noise of the gradient divided by ``P = √v̂ + ε`` (Pollux/AdaptDL measure the noise
scale of Adam this way). :class:`Preconditioner` reads ``P`` of every measured parameter from its
optimizer's state, before the step that is being measured updates it, and hands the noise meter
``1 / P²``: the weight of each squared gradient element.

Supported: Adam, AdamW, NAdam, RAdam (``exp_avg_sq`` or, with ``amsgrad``, ``max_exp_avg_sq``,
bias-corrected with ``β₂`` and the step count; RAdam's rectification, a scalar, is left out), Adamax (``exp_inf``), RMSprop (``square_avg``, less
``grad_avg²`` when centered) and Adagrad (``sum``). SGD's preconditioner is the identity. A
parameter whose optimizer has no state for it yet (the first step) is measured raw, as Adam's first
step is nearly sign descent anyway.

Examples:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> adam = torch.optim.Adam([w], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    >>> precondition = Preconditioner({"w": w}, [adam])
    >>> precondition.kind, precondition.weights()  # no state before the first step: raw
    ('preconditioned', {})
    >>> w.grad = torch.tensor([0.5, 2.0]); adam.step()
    >>> weights = precondition.weights()["w"]  # v̂ = g² after one step: P = |g| + ε
    >>> [round(float(v), 4) for v in weights]
    [4.0, 0.25]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["ADAPTIVE", "Preconditioner", "resolve_noise_gradients"]

#: Optimizers whose step divides by a running second moment, by class name: the state key it lives in.
ADAPTIVE = {
    "Adam": "exp_avg_sq",
    "AdamW": "exp_avg_sq",
    "NAdam": "exp_avg_sq",
    "RAdam": "exp_avg_sq",
    "Adamax": "exp_inf",
    "RMSprop": "square_avg",
    "Adagrad": "sum",
}
#: Optimizers whose preconditioner is the identity.
PLAIN = ("SGD",)


def resolve_noise_gradients(
    choice: str, optimizers: Iterable[torch.optim.Optimizer]
) -> tuple[str, list[str]]:
    """``(raw | preconditioned, optimizers with no known preconditioner)`` for ``choice``.

    ``auto``: preconditioned when an optimizer is adaptive, else raw. An optimizer neither adaptive
    nor plain is named in the second item: its parameters are measured raw.

    >>> net = nn.Linear(2, 1)
    >>> resolve_noise_gradients("auto", [torch.optim.AdamW(net.parameters())])
    ('preconditioned', [])
    >>> resolve_noise_gradients("auto", [torch.optim.SGD(net.parameters(), lr=0.1)])
    ('raw', [])
    >>> resolve_noise_gradients("preconditioned", [torch.optim.Adadelta(net.parameters())])
    ('preconditioned', ['Adadelta'])
    """
    names = [type(o).__name__ for o in optimizers]
    unknown = sorted({n for n in names if n not in ADAPTIVE and n not in PLAIN})
    if choice == "auto":
        choice = "preconditioned" if any(n in ADAPTIVE for n in names) else "raw"
    return choice, unknown if choice == "preconditioned" else []


class Preconditioner:
    """``1 / P²`` for each named parameter whose adaptive optimizer has state for it."""

    kind = "preconditioned"

    def __init__(
        self, params: Mapping[str, nn.Parameter], optimizers: Iterable[torch.optim.Optimizer]
    ) -> None:
        owner: dict[int, tuple[torch.optim.Optimizer, dict[str, object]]] = {}
        for optimizer in optimizers:
            if type(optimizer).__name__ not in ADAPTIVE:
                continue
            for group in optimizer.param_groups:
                for p in group["params"]:
                    owner[id(p)] = (optimizer, group)
        self._owned = [(name, p, *owner[id(p)]) for name, p in params.items() if id(p) in owner]

    def weights(self) -> dict[str, Tensor]:
        """``{name: 1 / P²}`` (float32 or wider, the parameter's shape) for the parameters with state now."""
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, p, optimizer, group in self._owned:
                state = optimizer.state.get(p)
                if not state:
                    continue
                denominator = _denominator(type(optimizer).__name__, state, group)
                if denominator is not None:
                    out[name] = denominator.to(torch.promote_types(denominator.dtype, torch.float32)).pow(-2)
        return out


def _denominator(kind: str, state: Mapping[str, object], group: Mapping[str, object]) -> Tensor | None:
    """``P``, what the optimizer divides its step by elementwise (None: state of an unknown shape)."""
    eps = float(group["eps"])  # type: ignore[arg-type]
    if kind == "Adamax":
        exp_inf = state.get("exp_inf")  # max(β₂·u, |g| + ε): ε is inside already
        return exp_inf if isinstance(exp_inf, Tensor) else None
    key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else ADAPTIVE[kind]
    second = state.get(key)
    if not isinstance(second, Tensor):
        return None
    if kind == "RMSprop":
        grad_avg = state.get("grad_avg")
        if group.get("centered") and isinstance(grad_avg, Tensor):
            second = second - grad_avg.pow(2)
        return second.sqrt() + eps
    if kind == "Adagrad":
        return second.sqrt() + eps
    beta2 = float(group["betas"][1])  # type: ignore[index]
    step = float(state["step"])  # type: ignore[arg-type]  # a tensor or a number, by implementation
    corrected: Tensor = (second / (1.0 - beta2**step)).sqrt()
    return corrected + eps
