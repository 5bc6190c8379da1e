"""What the callback measures, named and grouped: the optimizers' parameters, and the groups a warning names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_batch.plugin.measured import describe_groups, optimized_parameters, parameter_groups


def test_the_optimizers_parameters_by_the_modules_names_each_once_and_only_those_that_learn():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    net[0].bias.requires_grad_(False)
    extra, more = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))  # not the module's
    optimizers = [
        torch.optim.SGD([{"params": net[0].parameters()}, {"params": [net[1].weight]}], lr=0.1),
        torch.optim.SGD([net[1].weight, net[1].bias, extra, more], lr=0.1),  # the weight again: once
    ]
    found = optimized_parameters(optimizers, net)
    assert list(found) == ["0.weight", "1.weight", "1.bias", "optimizer1.param1", "optimizer1.param2"]
    assert found["optimizer1.param1"] is extra and found["optimizer1.param2"] is more
    assert found["1.weight"] is net[1].weight


def test_groups_merge_the_layers_of_a_stack_and_give_shares_of_all_parameters():
    params = {
        **{f"encoder.layer.{i}.attn.weight": nn.Parameter(torch.zeros(4)) for i in range(3)},
        **{f"encoder.layer.{i}.attn.bias": nn.Parameter(torch.zeros(1)) for i in range(3)},
        "0.rnn.weight_hh_l0": nn.Parameter(torch.zeros(2)),
        "head.weight": nn.Parameter(torch.zeros(5)),
    }
    groups = parameter_groups(
        [
            "encoder.layer.0.attn.weight",
            "encoder.layer.2.attn.weight",
            "encoder.layer.1.attn.bias",
            "0.rnn.weight_hh_l0",
        ],
        params,
    )
    assert groups == [
        ("encoder.layer.*.attn.weight", pytest.approx(8 / 22)),
        ("0.rnn.weight_hh_l0", pytest.approx(2 / 22)),
        ("encoder.layer.1.attn.bias", pytest.approx(1 / 22)),
    ]
    assert parameter_groups([], params) == []
    equal = {"b": nn.Parameter(torch.zeros(2)), "a": nn.Parameter(torch.zeros(2))}
    assert [name for name, _ in parameter_groups(["b", "a"], equal)] == ["a", "b"], "equal shares: by name"


def test_shares_read_as_percentages_a_reader_can_tell_from_zero():
    assert describe_groups([("a", 0.5), ("b.*", 0.0123), ("c", 0.000456), ("d", 0.0), ("e", 0.0099)]) == (
        "a (50%), b.* (1%), c (0.046%), d (0%), e (0.99%)"
    )
    assert describe_groups([]) == ""


def _measured_once(net: nn.Module, batch_loss=None):
    from lightning_batch.plugin.noise import NoiseMeter

    meter = NoiseMeter(dict(net.named_parameters()), module=net, batch_loss=batch_loss)
    x = torch.randn(4, 3)
    meter.begin_step(True, (x, torch.zeros(4, 1)))
    net(x).sum().backward()
    meter.after_backward()
    meter.before_optimizer_step()
    return meter


def test_the_summary_names_each_group_its_share_the_reason_and_what_is_done_instead():
    from lightning_batch.plugin.measured import not_exact_summary

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.PReLU(), nn.Linear(3, 1))  # 12 + 1 + 4 elements
    left_out = not_exact_summary(_measured_once(net), 8)
    assert left_out == (
        "94.1% of the parameters are measured exactly; these are left out of the noise scale (no loss to run "
        "micro-batches): 1.weight (6%) (used by prelu, which has no per-example rule)"
    )
    fallback = not_exact_summary(_measured_once(net, batch_loss=lambda batch: net(batch[0]).sum()), 6)
    assert fallback.startswith(
        "94.1% of the parameters are measured exactly; these are measured from 6 micro-batches"
    )
    assert (
        not_exact_summary(_measured_once(net))
        == "no parameter has a per-example rule (used by prelu, which has no per-example rule)"
    )


def test_a_model_with_no_parameter_measured_exactly_says_zero_percent():
    from lightning_batch.plugin.measured import not_exact_summary

    torch.manual_seed(0)
    net = nn.Sequential(nn.PReLU())  # one parameter, no per-example rule
    assert not_exact_summary(_measured_once(net), 4).startswith(
        "0.0% of the parameters are measured exactly; these are left out of the noise scale"
    )


def test_more_than_three_reasons_are_cut_short():
    from lightning_batch.plugin.measured import not_exact_summary

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Parameter(torch.ones(3)) for _ in range(4))

        def forward(self, x):
            return ((x * self.a) - self.b).exp().sum(1, keepdim=True) + (x / self.c).sin() @ self.d[:, None]

    summary = not_exact_summary(_measured_once(Odd()))
    reasons = [
        f"used by {name}, which has no per-example rule" for name in ("__getitem__", "div", "mul", "sub")
    ]
    # four reasons (d's first use is its indexing): the first three, then an ellipsis
    assert summary == f"no parameter has a per-example rule ({'; '.join(reasons[:3])}; ...)", summary

    class Three(Odd):
        def forward(self, x):
            return ((x * self.a) - self.b).exp().sum(1, keepdim=True) + (x / self.c * self.d).sum(
                1, keepdim=True
            )

    three = not_exact_summary(_measured_once(Three()))
    assert three == f"no parameter has a per-example rule ({'; '.join(reasons[1:])})", three


def test_the_refusal_of_several_optimizers_is_one_line_naming_what_to_pass():
    from lightning_batch.plugin.measured import UnsupportedSetupError

    error = UnsupportedSetupError.several_optimizers("Gan", 3, "noise", "adascale")
    assert isinstance(error, ValueError) and "\n" not in str(error)
    assert str(error) == (
        "DynamicBatchSize: Gan steps 3 optimizers by manual optimization, and policy='noise' with "
        "lr_rule='adascale' would rescale each optimizer's lr from one noise scale of all their parameters; "
        "pass policy='memory' (or 'fixed', 'schedule') and lr_rule='sqrt' (or 'linear', 'none')"
    )
