"""MLflow, ``[tracking]``: where runs are kept and what each one records.

``store`` (the store and its experiments), ``logger`` (metrics written in batches, off the training
thread), ``run_record`` (a run opened, written and ended once), ``run_owners`` (which process owns
a RUNNING run, and reaping the lost ones), ``datasets`` (a run's dataset input), ``plots``,
``run_model`` (the run's MLflow Model), ``model_registry`` (MLflow's Model Registry and the
``champion`` alias), ``prediction`` (``run.py predict``) and ``report`` (``run.py report``).
"""
