"""The lr a real fit trains with after each batch-size change, against the test's own formulas.

Each fit records, with every decision, the noise statistics it was taken from (``grad_sqr``, the
EMA of |G|², and ``grad_var``, of tr Σ). The lr MLflow logged after the change must be lr0 times
the rule's multiplier computed here from those statistics: AdaScale's gain (Johnson et al. 2020),
√(B/B0) or B/B0; and ``--lr-rule auto`` must pick AdaScale for SGD and √ for Adam and AdamW.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightning_batch.config import RunConfig
from lightning_batch.training import train


def _adascale(b: float, b0: float, grad_sqr: float, trace: float) -> float:
    """r = (σ² + |G|²) / (σ²/S + |G|²) with σ² = tr Σ / B0 and S = B / B0, written out."""
    return (trace / b0 + grad_sqr) / (trace / b + grad_sqr)


RULES = {
    "adascale": lambda d, b0: _adascale(d["to"], b0, d["grad_sqr"], d["grad_var"]),
    "sqrt": lambda d, b0: math.sqrt(d["to"] / b0),
    "linear": lambda d, b0: d["to"] / b0,
}


@pytest.mark.parametrize(
    ("optimizer", "lr_rule", "expected_rule"),
    [
        ("sgd", "auto", "adascale"),
        ("adam", "auto", "sqrt"),
        ("adamw", "auto", "sqrt"),
        ("sgd", "linear", "linear"),  # an explicit rule wins over auto
    ],
)
def test_the_lr_after_each_resize_follows_the_rule_of_the_logged_statistics(
    tracking_uri: str, workdir: Path, optimizer: str, lr_rule: str, expected_rule: str
):
    lr0, b0 = (0.02, 16) if optimizer == "sgd" else (0.002, 16)
    cfg = RunConfig(
        data="synthetic-regression",
        rows=1500,
        features=4,
        batch_size=b0,
        policy="noise",
        lr_rule=lr_rule,
        optimizer=optimizer,
        lr=lr0,
        epochs=1,
        adjust_every=10,
        log_every=1,
        seed=3,
        tracking_uri=tracking_uri,
    )
    result = train(cfg, progress_bar=False, evaluate_test=False)
    client = MlflowClient(tracking_uri)
    decisions = json.loads(
        Path(client.download_artifacts(result.run_id, "batch_size_decisions.json", str(workdir))).read_text()
    )["decisions"]
    changes = [d for d in decisions if d["to"] != b0]
    assert changes, "the fit must have moved the batch away from B0"
    lr_by_step = {m.step: m.value for m in client.get_metric_history(result.run_id, "lr")}
    for decision in decisions:
        expected = RULES[expected_rule](decision, b0)
        assert decision["lr_scale"] == pytest.approx(expected, rel=1e-9), decision
        # the optimizer trained with it from the decision's step on (logged at every step)
        assert lr_by_step[decision["step"]] == pytest.approx(lr0 * expected, rel=1e-6), decision
    # the other rules would have given other numbers: the check tells them apart
    for other, rule in RULES.items():
        if other != expected_rule:
            assert any(d["lr_scale"] != pytest.approx(rule(d, b0), rel=1e-3) for d in changes), other
