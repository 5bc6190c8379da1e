"""The terminal bar shows the batch size, lr and noise scale while a run trains."""

from __future__ import annotations

from lightning_batch.config import RunConfig
from lightning_batch.training import train


def test_the_progress_bar_shows_batch_size_lr_and_noise_scale(tracking_uri: str, capsys):
    cfg = RunConfig(
        data="synthetic-regression", rows=4000, batch_size="auto", epochs=2, tracking_uri=tracking_uri
    )
    train(cfg, progress_bar=True)
    captured = capsys.readouterr()
    err = (captured.out + captured.err).replace("\r", "\n")
    last = [line for line in err.splitlines() if line.startswith("Epoch 1")][-1]
    assert "B=" in last and "lr=" in last and "gns=" in last, last
    # the bar's total follows the resized epoch: it ends at 100%
    assert "100%" in last, last


def test_no_bar_when_not_asked_outside_a_terminal(tracking_uri: str, capsys):
    train(RunConfig(data="iris", epochs=1, tracking_uri=tracking_uri))
    captured = capsys.readouterr()
    assert "Epoch 0" not in captured.out + captured.err
