"""Each per-example rule against ``torch.func`` per-example gradients, in float64.

The reference takes each example alone through ``functional_call`` under ``vmap(grad(...))``: the
per-example loss is the batch loss on a batch of one, and the batch loss is their mean, as the
rules assume. A rule passes when the norms it computes from the step's own activations and
output gradients equal the reference's, parameter by parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from lightning_batch.plugin.per_example import PerExampleNorms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _float64():
    """Every model and batch here in float64 (only while these tests run: other modules' need float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def reference(model: nn.Module, loss_fn: Callable[..., Tensor], *batch: Tensor) -> dict[str, Tensor]:
    """Each parameter's per-example squared gradient norm, from torch.func (one example at a time)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(params: dict[str, Tensor], *example: Tensor) -> Tensor:
        inputs = [t.unsqueeze(0) for t in example]
        return loss_fn(functional_call(model, (params, buffers), tuple(inputs[:-1])), inputs[-1])

    grads = vmap(grad(one), in_dims=(None, *([0] * len(batch))))(params, *batch)
    return {n: g.flatten(1).pow(2).sum(dim=1) for n, g in grads.items()}


def measured(model: nn.Module, loss_fn: Callable[..., Tensor], *batch: Tensor, names=None, passes: int = 1):
    """The rules' per-example norms of ``names`` (default: each parameter alone, then all together)."""
    named = dict(model.named_parameters())
    groups = [[n] for n in named] + [list(named)] if names is None else [names]
    out = {}
    for group in groups:
        norms = PerExampleNorms({n: named[n] for n in group}, modules=model.modules())
        model.zero_grad()
        rows = len(batch[0])
        norms.start(rows)
        for part in range(passes):  # a step as several passes over parts of the rows, as an OOM split does
            chunk = [t.tensor_split(passes)[part] for t in batch]
            loss = loss_fn(model(*chunk[:-1]), chunk[-1]) * len(chunk[0]) / rows
            loss.backward()
        result = norms.finish()
        norms.remove()
        out["+".join(group)] = result
    return out


def assert_rules_match(model, loss_fn, *batch, passes: int = 1, rtol: float = 1e-9) -> None:
    ref = reference(model, loss_fn, *batch)
    got = measured(model, loss_fn, *batch, passes=passes)
    for name, expected in ref.items():
        result = got[name]
        assert result is not None and result.exact == (name,), (name, result and result.reasons)
        torch.testing.assert_close(result.per_example, expected, rtol=rtol, atol=1e-12, msg=name)
    everything = got["+".join(ref)]
    torch.testing.assert_close(everything.per_example, sum(ref.values()), rtol=rtol, atol=1e-12)


def mse(out: Tensor, target: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, target)


def token_ce(logits: Tensor, target: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten())


# -- linear -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "d_in", "d_out"), [(1, 5, 3), (6, 4, 3), (3, 16, 16)], ids=["2-D", "materialised", "ghost"]
)
def test_linear_on_inputs_of_any_rank(tokens, d_in, d_out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, d_out))
    shape = (7, d_in) if tokens == 1 else (7, tokens, d_in)
    x, y = torch.randn(shape), torch.randn(*shape[:-1], d_out)
    assert_rules_match(model, mse, x, y)


def test_a_layer_called_twice_and_a_step_in_two_passes():
    torch.manual_seed(1)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.shared(torch.tanh(self.shared(x))))

    model, x, y = Twice(), torch.randn(8, 3, 4), torch.randn(8, 3, 2)
    assert_rules_match(model, mse, x, y)
    assert_rules_match(model, mse, x, y, passes=2)


# -- embedding ------------------------------------------------------------------------------------------


def test_embedding_with_repeated_ids_and_padding():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Linear(4, 3))
    ids = torch.randint(0, 6, (9, 5))
    ids[:, -2:] = 0  # padding at the end of every sequence
    ids[0] = torch.tensor([3, 3, 3, 0, 0])  # one id three times in one example
    assert_rules_match(model, token_ce, ids, torch.randint(3, (9, 5)))


class LearnedPositions(nn.Module):
    """Word embeddings plus position embeddings looked up once for all examples (shape (1, T)), as in BERT."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(10, 6)
        self.positions = nn.Embedding(8, 6)
        self.register_buffer("position_ids", torch.arange(8)[None])
        self.offset = nn.Parameter(torch.randn(6) * 0.1)  # a bias-like parameter added to every token
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.words(ids)
        x += self.positions(self.position_ids[:, : ids.shape[1]])
        return self.out(self.norm(x + self.offset))


def test_a_lookup_shared_by_every_example_is_measured_where_it_is_added():
    torch.manual_seed(3)
    assert_rules_match(LearnedPositions(), token_ce, torch.randint(10, (6, 5)), torch.randint(3, (6, 5)))


# -- normalisation ---------------------------------------------------------------------------------------


def test_layer_norm_on_tokens():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    assert_rules_match(model, mse, torch.randn(5, 4, 5), torch.randn(5, 4, 2))


def test_group_norm_and_batch_norm_in_eval_mode_on_images():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    model[4].running_mean.uniform_(-0.5, 0.5)
    model[4].running_var.uniform_(0.5, 2.0)
    model.eval()  # running statistics: no example's output depends on another's
    assert_rules_match(model, mse, torch.randn(6, 2, 6, 6), torch.randn(6, 3))


def test_batch_norm_in_training_holds_the_batch_statistics_fixed():
    """In training a batch norm mixes the examples; the rule's per-example gradients are those with the
    batch's mean and variance held fixed. The reference: the same model with them as constants."""
    torch.manual_seed(6)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn, nn.Linear(3, 2))
    got = measured(model, mse, x, y, names=["0.weight", "0.bias"])["0.weight+0.bias"]
    mean, var = x.mean(0), x.var(0, unbiased=False)

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias, self.lin = bn.weight, bn.bias, model[1]

        def forward(self, inp: Tensor) -> Tensor:
            return self.lin((inp - mean) / torch.sqrt(var + bn.eps) * self.weight + self.bias)

    ref = reference(Fixed(), mse, x, y)
    torch.testing.assert_close(got.per_example, ref["weight"] + ref["bias"], rtol=1e-9, atol=1e-12)


def test_parameters_before_a_training_batch_norm_are_left_to_the_caller():
    """A batch norm on the batch's statistics couples the examples' gradients upstream of it: the
    parameters used before the last one are not measured per example (COUPLED); that batch norm's own
    affine parameters and what follows are, exactly. In eval mode nothing is coupled."""
    from lightning_batch.plugin.per_example import COUPLED

    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)
    )
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    norms = PerExampleNorms(dict(model.named_parameters()))
    norms.start(8)
    mse(model(x), y).backward()
    result = norms.finish()
    assert result is not None
    assert sorted(result.exact) == ["4.bias", "4.weight", "5.bias", "5.weight"]
    assert {name for name, why in result.reasons.items() if why == COUPLED} == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    }
    model.eval()
    norms.start(8)
    mse(model(x), y).backward()
    assert sorted(norms.finish().exact) == sorted(name for name, _ in model.named_parameters())


def test_norm_layers_with_their_own_eps_on_sequences():
    """A non-default eps in every norm, and GroupNorm and BatchNorm1d on (batch, channels, length)."""
    torch.manual_seed(13)
    model = nn.Sequential(
        nn.BatchNorm1d(4, eps=0.3),  # first: nothing before it to couple; the batch's statistics
        nn.GroupNorm(2, 4, eps=0.2),
        nn.Tanh(),
        nn.Conv1d(4, 4, 1),
        nn.BatchNorm1d(4, eps=0.4).eval(),
        nn.Flatten(),
        nn.LayerNorm(24, eps=0.5),
        nn.Linear(24, 2),
    )
    model[4].running_mean.uniform_(-0.5, 0.5)
    model[4].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(6, 4, 6), torch.randn(6, 2)
    got = measured(model, mse, x, y, names=[n for n, _ in model.named_parameters() if not n.startswith("0.")])
    only = next(iter(got.values()))
    mean, var = x.mean(dim=(0, 2)), x.var(dim=(0, 2), unbiased=False)

    class Fixed(nn.Module):  # the first batch norm with the batch's statistics as constants
        def __init__(self) -> None:
            super().__init__()
            self.rest = model[1:]
            self.bn = model[0]

        def forward(self, inp: Tensor) -> Tensor:
            normalised = (inp - mean[:, None]) / torch.sqrt(var[:, None] + 0.3)
            return self.rest(normalised * self.bn.weight[:, None] + self.bn.bias[:, None])

    ref = reference(Fixed(), mse, x, y)
    expected = sum(v for k, v in ref.items() if not k.startswith("bn."))
    assert only is not None and len(only.exact) == 10
    torch.testing.assert_close(only.per_example, expected, rtol=1e-9, atol=1e-12)


class _Added(nn.Module):
    """Parameters added to the activations in the shapes hand-written models use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.lead = nn.Parameter(torch.randn(1, 1, 4))  # broadcast over batch and tokens
        self.per_token = nn.Parameter(torch.randn(5, 1))  # one per token, over the features
        self.flat = nn.Parameter(torch.randn(4))  # over batch and tokens, from the right

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)  # (B, 5, 4)
        h = torch.tanh(h + self.lead)
        h = torch.tanh(self.per_token + h)
        return (h + self.flat).sum(1)


def test_parameters_added_with_broadcasting_from_either_side():
    torch.manual_seed(14)
    assert_rules_match(_Added(), mse, torch.randn(6, 5, 3), torch.randn(6, 4))


@pytest.mark.parametrize(
    ("use", "why"),
    [
        (lambda h, p: torch.add(h, p, alpha=2.0), "used by add, which has no per-example rule"),
        (lambda h, p: h + (p + 1.0), "added to a number, not to the batch's activations"),
        (lambda h, p: h + p.expand(6, 4), "used by expand, which has no per-example rule"),
        (lambda h, p: h + p[None].repeat(6, 1), "used by __getitem__, which has no per-example rule"),
    ],
    ids=["alpha", "number", "expanded", "full-shape"],
)
def test_additions_without_a_rule_are_named(use, why):
    torch.manual_seed(15)
    lin, p = nn.Linear(3, 4), nn.Parameter(torch.randn(4))
    norms = PerExampleNorms({"p": p, **dict(lin.named_parameters())})
    norms.start(6)
    use(lin(torch.randn(6, 3)), p).pow(2).mean().backward()
    result = norms.finish()
    assert result is not None and "p" not in result.exact and norms.reasons["p"] == why


def test_a_parameter_of_the_activations_full_shape_is_not_per_example():
    torch.manual_seed(16)
    lin, p = nn.Linear(3, 4), nn.Parameter(torch.randn(6, 4))  # one row per example: not broadcast
    norms = PerExampleNorms({"p": p, **dict(lin.named_parameters())})
    norms.start(6)
    (lin(torch.randn(6, 3)) + p).pow(2).mean().backward()
    norms.finish()
    assert norms.reasons["p"] == "added elementwise without being broadcast over the batch"


# -- convolution ----------------------------------------------------------------------------------------


def test_conv1d_and_conv2d_with_stride_dilation_padding_and_groups():
    torch.manual_seed(7)
    image = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(6, 2, 2, dilation=2),
        nn.Flatten(),
    )
    x = torch.randn(5, 4, 9, 9)
    out = image(x).shape[1]
    assert_rules_match(image, mse, x, torch.randn(5, out))
    signal = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=2), nn.Tanh(), nn.Conv1d(4, 2, 2, stride=2), nn.Flatten()
    )
    x = torch.randn(5, 3, 11)
    assert_rules_match(signal, mse, x, torch.randn(5, signal(x).shape[1]))


def test_convolutions_with_more_channels_than_positions_take_the_unfolded_rule():
    """Where C_out exceeds the output positions the rule unfolds the patches (the grouped-convolution
    form would hold a larger per-example gradient): both forms agree with torch.func."""
    torch.manual_seed(17)
    deep = nn.Sequential(nn.Conv2d(4, 16, 2, groups=2), nn.Tanh(), nn.Conv2d(16, 12, 2), nn.Flatten())
    x = torch.randn(5, 4, 3, 3)  # 4 then 1 output positions, 16 and 12 channels
    assert_rules_match(deep, mse, x, torch.randn(5, deep(x).shape[1]))
    signal = nn.Sequential(nn.Conv1d(3, 9, 3), nn.Flatten())
    x = torch.randn(4, 3, 5)  # 3 positions, 9 channels
    assert_rules_match(signal, mse, x, torch.randn(4, signal(x).shape[1]))


class _FunctionalConvs(nn.Module):
    """Convolutions called as functions, as hand-written models do: the defaults (stride, padding,
    dilation, groups) left out, keywords, and a 1-d convolution with more channels than positions."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(4) * 0.1)
        self.w2 = nn.Parameter(torch.randn(6, 4, 2, 2) * 0.3)
        self.w3 = nn.Parameter(torch.randn(12, 6, 3) * 0.3)  # unfolded: 12 channels, 2 positions

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.conv2d(x, self.w1, self.b1))  # (B, 4, 5, 5)
        h = torch.tanh(F.conv2d(h, self.w2, stride=2, padding="valid"))  # (B, 6, 2, 2)
        signal = h.flatten(2)  # (B, 6, 4)
        return F.conv1d(signal, self.w3, stride=2, padding=2, dilation=2).flatten(1)


def test_convolutions_called_as_functions_with_their_defaults_and_keywords():
    torch.manual_seed(18)
    model = _FunctionalConvs()
    x = torch.randn(4, 2, 7, 7)
    assert_rules_match(model, mse, x, torch.randn(4, model(x).shape[1]))
    assert_rules_match(model, mse, x, torch.randn(4, model(x).shape[1]), passes=2)


def test_a_convolution_it_cannot_read_is_named_with_why():
    torch.manual_seed(19)
    same = nn.Conv2d(2, 3, 3, padding="same")
    unbatched = nn.Conv2d(2, 3, 3)
    for model, x in ((same, torch.randn(4, 2, 5, 5)), (unbatched, torch.randn(2, 5, 5))):
        norms = PerExampleNorms(dict(model.named_parameters()))
        norms.start(4 if x.dim() == 4 else 1)
        model(x).pow(2).mean().backward()
        assert norms.finish() is None
        assert norms.reasons == dict.fromkeys(
            ("weight", "bias"), "a convolution with string padding or an unbatched input"
        )


# -- attention ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_multi_head_attention_self_and_cross(batch_first):
    torch.manual_seed(8)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
            self.cross = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=5, vdim=3)
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor, memory: Tensor, mem_values: Tensor) -> Tensor:
            if not batch_first:
                x, memory, mem_values = x.transpose(0, 1), memory.transpose(0, 1), mem_values.transpose(0, 1)
            h, _ = self.self_attn(x, x, x)
            h, _ = self.cross(h, memory, mem_values)
            out = self.head(h)
            return out if batch_first else out.transpose(0, 1)

    model = Attend()
    batch = (torch.randn(4, 5, 8), torch.randn(4, 6, 5), torch.randn(4, 6, 3), torch.randn(4, 5, 2))

    def loss(out: Tensor, target: Tensor) -> Tensor:
        return mse(out, target)

    def forward_loss(params, *example):
        return loss(functional_call(model, params, tuple(example[:-1])), example[-1])

    assert_rules_match(model, loss, *batch)
    # The measured step computes what the plain module computes.
    norms = PerExampleNorms(dict(model.named_parameters()), modules=model.modules())
    plain = model(*batch[:3])
    norms.start(4)
    watched = model(*batch[:3])
    norms.remove()
    torch.testing.assert_close(watched, plain, rtol=1e-12, atol=1e-12)


def test_a_transformer_layer_built_sequence_first():
    torch.manual_seed(9)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=False)

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.head = layer, nn.Linear(8, 2)

        def forward(
            self, x: Tensor
        ) -> Tensor:  # x: (batch, seq, features); the layer wants (seq, batch, features)
            return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1))

    assert_rules_match(SeqFirst(), mse, torch.randn(3, 4, 8), torch.randn(3, 4, 2))


# -- what the rules do not cover --------------------------------------------------------------------------


def test_a_parameter_used_by_a_function_without_a_rule_is_named_and_left_out():
    torch.manual_seed(10)

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(3, 4)
            self.matrix = nn.Parameter(torch.randn(4, 2))

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(self.first(x)) @ self.matrix

    model = Custom()
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    result = measured(model, mse, x, y, names=["first.weight", "first.bias", "matrix"])[
        "first.weight+first.bias+matrix"
    ]
    assert result.exact == ("first.bias", "first.weight")
    assert "matrix" in result.reasons and "no per-example rule" in result.reasons["matrix"]
    ref = reference(model, mse, x, y)
    torch.testing.assert_close(
        result.per_example, ref["first.weight"] + ref["first.bias"], rtol=1e-9, atol=1e-12
    )


def test_nothing_measured_is_none_and_unused_parameters_are_measured_as_zero():
    torch.manual_seed(11)
    used, unused = nn.Linear(2, 2), nn.Linear(2, 2)
    norms = PerExampleNorms({"used.weight": used.weight, "unused.weight": unused.weight})
    norms.start(4)
    (torch.randn(4, 2) @ used.weight.t()).sum().backward()  # used, but not by a rule
    assert norms.finish() is None
    norms.start(4)
    used(torch.randn(4, 2)).sum().backward()
    result = norms.finish()
    assert result is not None and result.exact == ("unused.weight", "used.weight")
    assert math.isfinite(float(result.per_example.sum()))


# -- the refusals a user's layer can trigger ------------------------------------------------------------


def _reasons_after(params: dict[str, nn.Parameter], rows: int, step: Callable[[], Tensor]) -> dict[str, str]:
    """The reasons of one step's parameters after ``step()``'s loss is backpropagated."""
    norms = PerExampleNorms(params)
    norms.start(rows)
    step().backward()
    norms.finish()
    norms.remove()
    return dict(norms.reasons)


def test_embeddings_of_one_id_per_example_and_a_negative_padding_index():
    torch.manual_seed(20)
    # A categorical feature: one id per example (1-D ids), as in a tabular model.
    assert_rules_match(
        nn.Sequential(nn.Embedding(7, 3), nn.Linear(3, 2)), mse, torch.randint(7, (8,)), torch.randn(8, 2)
    )
    weight = nn.Parameter(torch.randn(6, 4))

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = weight

        def forward(self, ids: Tensor) -> Tensor:
            return F.embedding(ids, self.weight, padding_idx=-1).sum(dim=1)  # -1: the last row pads

    ids = torch.randint(0, 6, (5, 4))
    ids[:, -1] = 5
    assert_rules_match(Functional(), mse, ids, torch.randn(5, 4))


@pytest.mark.parametrize("option", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}])
def test_an_embedding_that_rescales_its_rows_or_gradients_is_named(option):
    table = nn.Embedding(6, 3, **option)
    reasons = _reasons_after(
        {"table": table.weight}, 4, lambda: table(torch.randint(6, (4, 3))).pow(2).mean()
    )
    assert reasons["table"] == "an embedding with max_norm or scale_grad_by_freq"


def test_a_linear_layer_on_one_example_without_a_batch_dimension_is_named():
    lin = nn.Linear(3, 2)
    reasons = _reasons_after(dict(lin.named_parameters()), 1, lambda: lin(torch.randn(3)).pow(2).sum())
    assert reasons == dict.fromkeys(
        ("weight", "bias"), "a linear layer on an input without a batch dimension"
    )


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True), (3, 5, 4)),
        (lambda: nn.MultiheadAttention(4, 2), (5, 4)),  # unbatched: (sequence, features)
    ],
    ids=["bias_kv", "unbatched"],
)
def test_multi_head_attention_it_cannot_read_is_named(build, shape):
    torch.manual_seed(21)
    attention = build()
    x = torch.randn(*shape)
    rows = shape[0] if len(shape) == 3 else 1
    reasons = _reasons_after(
        dict(attention.named_parameters()), rows, lambda: attention(x, x, x)[0].pow(2).mean()
    )
    why = "multi-head attention with add_bias_kv, static keys or unbatched inputs"
    assert reasons["in_proj_weight"] == why and reasons["in_proj_bias"] == why


def test_a_parameter_used_as_a_weight_and_as_a_bias_or_by_two_rules_is_named():
    torch.manual_seed(22)
    p = nn.Parameter(torch.randn(4) + 1.0)
    x = torch.randn(5, 4)
    both_roles = _reasons_after({"p": p}, 5, lambda: F.layer_norm(x, (4,), p, p).pow(2).mean())
    assert both_roles["p"] == "used as a weight and as a bias in one step"
    lin = nn.Linear(4, 4)
    two_rules = _reasons_after(
        {"p": p, "w": lin.weight}, 5, lambda: F.linear(F.layer_norm(x, (4,), p), lin.weight, p).pow(2).mean()
    )
    assert two_rules["p"] == "used by linear and norm rules in one step" and "w" not in two_rules


def test_float32_models_get_norms_summed_in_float64():
    """Outside the float64 fixture: the norms come back in float64 whatever the model's dtype."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(23)
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    unused = nn.Linear(2, 2)
    params = {**dict(model.named_parameters()), "unused": unused.weight}
    norms = PerExampleNorms(params, modules=model.modules())
    norms.start(4)
    model(torch.randint(5, (4, 3))).pow(2).mean().backward()
    result = norms.finish()
    assert result is not None and result.per_example.dtype == torch.float64 and len(result.exact) == 6
    for passes in (1, 2):  # a pass that never reaches a parameter still gives float64 zeros for its rows
        norms.start(4)
        for part in torch.randint(5, (4, 3)).tensor_split(passes):
            model(part).pow(2).mean().backward()
        assert norms.finish().per_example.dtype == torch.float64
