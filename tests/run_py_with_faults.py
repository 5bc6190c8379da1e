"""``experiments/run.py`` with a fault injected from the environment, for tests/test_ddp_cli.py and
tests/test_faults.py.

Lightning's DDP launcher starts the other ranks by running this same command again, so the fault
reaches every rank through the environment they inherit:

- ``LB_KILL_AT_STEP=N``: every rank SIGKILLs itself once N optimizer steps are done (after the
  step checkpoint of step N, when ``--checkpoint-every`` divides N): a crash at a known step.
- ``LB_FAIL_AT_STEP=N`` and ``LB_FAIL_RANK=R``: global rank R raises ``RuntimeError`` at step N.
- ``LB_STEP_SLEEP_S=S``: every step sleeps S seconds, so that a kill timed from outside the process
  lands while it still trains, however fast the machine (a tiny fit is over in about a second).

    python tests/run_py_with_faults.py train --devices 2 --strategy ddp ...
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl  # noqa: E402

import lightning_batch.training as training  # noqa: E402
from lightning_batch.cli import main  # noqa: E402


class Fault(pl.Callback):
    """After the built-in callbacks (the step checkpoint among them) at each batch end."""

    def __init__(self) -> None:
        self.kill_at = int(os.environ.get("LB_KILL_AT_STEP", 0))
        self.fail_at = int(os.environ.get("LB_FAIL_AT_STEP", 0))
        self.fail_rank = int(os.environ.get("LB_FAIL_RANK", 0))
        self.step_sleep_s = float(os.environ.get("LB_STEP_SLEEP_S", 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if self.kill_at and step >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_at and step >= self.fail_at and trainer.global_rank == self.fail_rank:
            raise RuntimeError(f"injected failure on rank {trainer.global_rank} at step {step}")


_train = training.train


def _train_with_fault(cfg, **options):
    options["callbacks"] = [*options.get("callbacks", ()), Fault()]
    return _train(cfg, **options)


training.train = _train_with_fault  # cli.run_train imports train when it runs

if __name__ == "__main__":
    sys.exit(main())
