"""What users saved before the package was laid out by role still loads (fixtures made at commit 3cb1407)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "logged_before_layout"


def test_a_model_logged_before_the_move_loads_and_predicts_as_it_did():
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(FIXTURES / "model"))
    said_then = pd.read_csv(FIXTURES / "model_predictions.csv")
    now = model.predict(pd.read_csv(FIXTURES / "model_inputs.csv"))
    assert list(now.columns) == list(said_then.columns)
    assert now["prediction"].tolist() == said_then["prediction"].tolist()
    np.testing.assert_allclose(
        now[["high", "low"]].to_numpy(), said_then[["high", "low"]].to_numpy(), atol=1e-6
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_checkpoint_saved_before_the_move_resumes_the_callback_where_it_was():
    from lightning_batch import DynamicBatchSize, TabularDataModule, TaskModule, build_model

    facts = json.loads((FIXTURES / "checkpoint_facts.json").read_text())
    dm = TabularDataModule(data="synthetic-regression", rows=2000, features=4, batch_size=16, seed=0)
    dm.setup()
    module = TaskModule(build_model("linear", dm.n_features, 1), lr=0.05)
    resize = DynamicBatchSize(policy="noise", adjust_every=10, probe_memory=False)
    seen: list[int] = []

    class Rows(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(len(batch[0]))

    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[resize, Rows()],
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=FIXTURES / "mid_epoch.ckpt", weights_only=True)
    # The first epoch ends where it would have: the rows the checkpoint had trained, plus the rest.
    assert facts["samples_seen"] + sum(seen) == len(dm.train_set)
    assert module.samples_seen == len(dm.train_set)
    assert len(resize.decisions) >= facts["decisions"]
    assert seen[0] == facts["batch_size"]  # the saved batch size, before any new decision
