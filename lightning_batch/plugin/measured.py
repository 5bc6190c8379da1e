"""What :class:`~lightning_batch.plugin.callback.DynamicBatchSize` measures, and how to say so.

The gradient noise scale is a property of the parameters an optimizer updates, wherever they live
in the module: :func:`optimized_parameters` finds them from the optimizers, named as the
LightningModule names them (``backbone.0.weight``, ``bert.encoder.layer.3...``). When part of them
cannot be measured exactly, :func:`parameter_groups` and :func:`describe_groups` say which, in
groups a reader can take in (the layers of a stack are one group), each with its share of the
parameters.

Examples:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.GRU(4, 2))
    >>> params = optimized_parameters([torch.optim.SGD(net.parameters(), lr=0.1)], net)
    >>> describe_groups(parameter_groups(["2.weight_ih_l0", "2.weight_hh_l0"], params))
    '2.weight_ih_l0 (27%), 2.weight_hh_l0 (14%)'
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_batch.plugin.noise import NoiseMeter

__all__ = [
    "UnsupportedSetupError",
    "describe_groups",
    "not_exact_summary",
    "optimized_parameters",
    "parameter_groups",
]


class UnsupportedSetupError(ValueError):
    """A fit the callback cannot serve as asked, said in one line with what to pass instead."""

    @classmethod
    def several_optimizers(
        cls, module: str, optimizers: int, policy: str, lr_rule: str
    ) -> UnsupportedSetupError:
        """Manual optimization with several optimizers and a policy or lr rule that reads the noise scale.

        >>> print(UnsupportedSetupError.several_optimizers("Gan", 2, "goodput", "adascale"))  # doctest: +ELLIPSIS
        DynamicBatchSize: Gan steps 2 optimizers by manual optimization, and policy='goodput' ...
        """
        return cls(
            f"DynamicBatchSize: {module} steps {optimizers} optimizers by manual optimization, and "
            f"policy={policy!r} with lr_rule={lr_rule!r} would rescale each optimizer's lr from one noise scale "
            "of all their parameters; pass policy='memory' (or 'fixed', 'schedule') and lr_rule='sqrt' (or "
            "'linear', 'none')"
        )


def optimized_parameters(
    optimizers: Sequence[torch.optim.Optimizer], module: nn.Module
) -> dict[str, nn.Parameter]:
    """The parameters the optimizers update (those that require gradients), by their names in ``module``.

    A parameter an optimizer holds that ``module`` does not name is called ``optimizer{i}.param{k}``.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> list(optimized_parameters([torch.optim.SGD(net[1].parameters(), lr=0.1)], net))
    ['1.weight', '1.bias']
    """
    names = {id(p): name for name, p in module.named_parameters()}
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for i, optimizer in enumerate(optimizers):
        k = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                found[names.get(id(p), f"optimizer{i}.param{k}")] = p
                k += 1
    return found


def parameter_groups(names: Iterable[str], params: Mapping[str, nn.Parameter]) -> list[tuple[str, float]]:
    """``names`` in groups, each with its share of all of ``params``' elements, the largest first.

    A group is the names that differ only in the numbers of their path (the layers of a stack):
    ``layer.*.attention.weight``; a group of one keeps its name.

    >>> params = {f"layer.{i}.w": nn.Parameter(torch.zeros(3)) for i in range(3)} | {"head": nn.Parameter(torch.zeros(1))}
    >>> parameter_groups(["layer.0.w", "layer.1.w"], params)
    [('layer.*.w', 0.6)]
    """
    total = sum(p.numel() for p in params.values()) or 1
    members: dict[str, list[str]] = defaultdict(list)
    for name in names:
        members[re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)].append(name)
    shares = [
        (
            group if len(group_names) > 1 else group_names[0],
            sum(params[n].numel() for n in group_names) / total,
        )
        for group, group_names in members.items()
    ]
    return sorted(shares, key=lambda item: (-item[1], item[0]))


def describe_groups(groups: Sequence[tuple[str, float]]) -> str:
    """Groups from :func:`parameter_groups` as ``name (share)``, comma-separated.

    >>> describe_groups([("layer.*.w", 0.6), ("head", 0.0004)])
    'layer.*.w (60%), head (0.04%)'
    """
    return ", ".join(f"{name} ({_percent(share)})" for name, share in groups)


def _percent(share: float) -> str:
    """A share as a percentage a reader can tell from zero."""
    value = 100.0 * share
    if value >= 1.0 or value == 0.0:
        return f"{value:.0f}%"
    return f"{value:.2g}%"


def not_exact_summary(meter: NoiseMeter, fallback_microbatches: int | None = None) -> str:
    """What the meter's last measured step did not measure exactly, in one line: every group with its
    share and the reasons; with ``fallback_microbatches``, the exact share first and what is done instead.

    >>> from lightning_batch.plugin.noise import NoiseMeter
    >>> net = nn.Sequential(nn.Linear(3, 3), nn.PReLU(), nn.Linear(3, 1))
    >>> meter = NoiseMeter(dict(net.named_parameters()))
    >>> meter.begin_step(True, torch.randn(4, 3))
    >>> net(torch.randn(4, 3)).sum().backward()
    >>> meter.after_backward(); meter.before_optimizer_step()
    >>> print(not_exact_summary(meter, 8))  # doctest: +NORMALIZE_WHITESPACE
    94.1% of the parameters are measured exactly; these are left out of the noise scale (no loss to run
    micro-batches): 1.weight (6%) (used by prelu, which has no per-example rule)
    """
    inexact = meter.inexact
    groups = describe_groups(parameter_groups(inexact, meter.params))
    reasons = sorted({meter.reasons.get(name, "no per-example rule") for name in inexact})
    why = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
    if fallback_microbatches is None:
        return f"no parameter has a per-example rule ({why})"
    how = (
        f"measured from {fallback_microbatches} micro-batches instead (slower)"
        if meter.can_fall_back
        else "left out of the noise scale (no loss to run micro-batches)"
    )
    return f"{meter.measured_fraction or 0.0:.1%} of the parameters are measured exactly; these are {how}: {groups} ({why})"
