"""lightning-batch's main job: ``python experiments/run.py [train|ui] [options]``.

With no arguments it trains the demo runs and prints where to look at them.
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing: the package sits one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_batch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
