"""Optuna, ``[tune]``: ``space`` (what a study searches, and :class:`~lightning_batch.tune.space.TuneConfig`,
how) and ``study`` (the study: trials as child MLflow runs, worker processes, the refit)."""
