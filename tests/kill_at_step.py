"""Train with ``lightning_batch.training.train`` and SIGKILL this very process at a fixed step.

Run as its own script by tests/test_resume.py: a kill from inside the fit lands at an exact step,
so the test knows which checkpoint the resume starts from, unlike a kill timed from outside.

    python tests/kill_at_step.py CONFIG_JSON KILL_STEP RECORD_JSON

Before dying it writes RECORD_JSON: for every trained step, ``[global_step, epoch, [row, ...]]``
with the row numbers (positions in the training set) that step trained, as
:class:`TrainedRows` records them.
"""

import json
import os
import signal
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.training import train  # noqa: E402


class TrainedRows(pl.Callback):
    """Which training rows each optimizer step trained, identified by their feature bytes.

    Recorded at batch end, so only steps that really trained count (a batch the loader fetched
    ahead does not). Rows are matched by content: the synthetic features are continuous, so two
    rows never share their bytes (checked at fit start).
    """

    def __init__(self) -> None:
        self.steps: list[list] = []
        self._row_of: dict[bytes, int] = {}

    def on_train_start(self, trainer, pl_module):
        features = trainer.datamodule.train_set.features
        self._row_of = {row.numpy().tobytes(): i for i, row in enumerate(features)}
        assert len(self._row_of) == len(features), "duplicate training rows: cannot identify them"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rows = [self._row_of[row.numpy().tobytes()] for row in batch[0].detach().cpu()]
        self.steps.append([trainer.global_step, trainer.current_epoch, rows])


class KillAtStep(pl.Callback):
    """SIGKILL the process once ``step`` optimizer steps are done, after writing the record."""

    def __init__(self, step: int, recorder: TrainedRows, out: Path) -> None:
        self.step, self.recorder, self.out = step, recorder, out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            self.out.write_text(json.dumps(self.recorder.steps))
            os.kill(os.getpid(), signal.SIGKILL)


def main(config: str, kill_step: str, out: str) -> None:
    torch.set_num_threads(1)
    recorder = TrainedRows()
    cfg = RunConfig(**json.loads(config))
    train(cfg, callbacks=[recorder, KillAtStep(int(kill_step), recorder, Path(out))], progress_bar=False)
    raise SystemExit("the fit ended before the kill step")


if __name__ == "__main__":
    main(*sys.argv[1:4])
