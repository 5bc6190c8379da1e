"""The default of every :class:`~lightning_batch.plugin.callback.DynamicBatchSize` option, in one place.

The callback's keyword arguments, :class:`~lightning_batch.config.RunConfig`'s fields (hence the
CLI flags and YAML keys) and the policy building blocks in :mod:`lightning_batch.plugin.policy` all take
their defaults from here, so a plugin user and a ``run.py train`` user get the same behaviour.
Plain numbers only: importing this module pulls in neither torch nor Lightning.

Why these values:

- ``MIN_BATCH = 1``: no floor beyond the data; the memory ceiling and the policy decide, and
  sizes below ``MULTIPLE`` stay allowed (a ``noise`` policy early in training may want them).
- ``MULTIPLE = 8``: sizes round to multiples of 8 (tensor-core and vector-width friendly).
- ``ADJUST_EVERY = 20`` and ``MIN_TIMED_STEPS = 20``: see :mod:`lightning_batch.plugin.cadence`.
- ``MEASURE_EVERY = 0`` and ``MEASURE_BUDGET = 0.02``: the callback times its own measurements
  and measures as often as 2% of the fit's time allows (densely at the start, where the estimates
  move fastest); a fixed N > 0 measures every N steps instead. A measurement costs about half a
  small tabular step on a 2-core CPU, so a fixed every 10 steps cost 5-6%
  (``benchmarks/noise_overhead.py``).
- ``HYSTERESIS = 0.05``: a resize must promise more than 5% to be worth its cost.
- ``NOISE_WINDOW = 0.25``: the noise EMAs forget in samples, with a half-life of a quarter of the
  samples seen so far (see :class:`~lightning_batch.plugin.noise.NoiseScaleEMA`).
- ``EMA_DECAY = 0.9``: the decay per measurement when ``NOISE_WINDOW`` is 0 (about 10 measurements).
- ``NOISE_K = 1.0``: the ``noise`` policy trains at B_noise itself (McCandlish et al. 2018).
- ``EXPLORE_FACTOR = 4.0``: ``goodput`` times a second size ×4 away once (the controller's trust
  region allows ×4 a decision), else its throughput model never fits.
- ``MIN_EFFICIENCY = 0.25``: ``goodput`` stays at batches that make at least a quarter of the
  progress per sample of B0 (about ``3 B_noise + 4 B0``): see
  :class:`~lightning_batch.plugin.policy.GoodputPolicy`. Not higher: with AdaScale's lr the noise floor
  ``lr / B`` falls only in proportion to the efficiency, so a bound of 0.5 keeps a run within 2x of
  B0's floor, and a precise target (the regression benchmark's 0.2% of the optimum) out of reach.
- ``MAX_LR_SCALE = 10``: the lr rules' multiplier is capped there (see
  :class:`~lightning_batch.plugin.policy.BatchSizeController`).
- ``SCHEDULE_FACTOR = 2.0``: Smith et al. 2017 double the batch where they would halve the lr.
- ``MEMORY_BUDGET = 0.5``: plan for half the free memory (on a CPU an OOM kills the process).
- ``LOG_EVERY = 10``: one metric row every 10 steps keeps MLflow's SQL store cheap.
- ``FALLBACK_MICROBATCHES = 8`` and ``FALLBACK_EVERY = 10``: micro-batch noise statistics for
  layers the per-example hooks cannot see (convolutions), see ``benchmarks/noise_overhead.py``.

>>> MIN_BATCH, MULTIPLE, MEASURE_BUDGET, NOISE_WINDOW
(1, 8, 0.02, 0.25)
"""

from __future__ import annotations

from lightning_batch.plugin.cadence import GOODPUT_MIN_TIMED_STEPS

#: The policy ``DynamicBatchSize()`` and ``--batch-size auto`` use.
POLICY = "goodput"
#: The lr rule ``DynamicBatchSize()`` uses (``--lr-rule auto`` picks it for SGD, sqrt for Adam).
LR_RULE = "adascale"
MIN_BATCH = 1
MULTIPLE = 8
ADJUST_EVERY = 20
MIN_TIMED_STEPS = GOODPUT_MIN_TIMED_STEPS
MEASURE_EVERY = 0
MEASURE_BUDGET = 0.02
HYSTERESIS = 0.05
EMA_DECAY = 0.9
NOISE_WINDOW = 0.25
NOISE_K = 1.0
EXPLORE_FACTOR = 4.0
MIN_EFFICIENCY = 0.25
MAX_LR_SCALE = 10.0
SCHEDULE_FACTOR = 2.0
PROBE_MEMORY = True
MEMORY_BUDGET = 0.5
LOG_EVERY = 10
FALLBACK_MICROBATCHES = 8
FALLBACK_EVERY = 10
#: Share of an accelerator's free memory the tabular data may take (the rest is the model's and the batch's).
DEVICE_DATA_BUDGET = 0.25
