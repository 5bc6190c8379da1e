"""What the callback measures, named and grouped: the optimizers' parameters, and the groups a warning names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_batch.plugin.measured import describe_groups, optimized_parameters, parameter_groups


def test_the_optimizers_parameters_by_the_modules_names_each_once_and_only_those_that_learn():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    net[0].bias.requires_grad_(False)
    extra = nn.Parameter(torch.zeros(2))  # held by an optimizer, not by the module
    optimizers = [
        torch.optim.SGD([{"params": net[0].parameters()}, {"params": [net[1].weight]}], lr=0.1),
        torch.optim.SGD([net[1].weight, net[1].bias, extra], lr=0.1),  # the weight again: counted once
    ]
    found = optimized_parameters(optimizers, net)
    assert list(found) == ["0.weight", "1.weight", "1.bias", "optimizer1.param1"]
    assert found["optimizer1.param1"] is extra and found["1.weight"] is net[1].weight


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


def test_shares_read_as_percentages_a_reader_can_tell_from_zero():
    assert describe_groups([("a", 0.5), ("b.*", 0.0123), ("c", 0.000456), ("d", 0.0)]) == (
        "a (50%), b.* (1%), c (0.046%), d (0%)"
    )
    assert describe_groups([]) == ""
