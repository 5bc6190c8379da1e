"""The import path every logged MLflow Model names: keep it importable forever.

A run's model is logged as MLflow "models from code": its ``pyfunc_model.py`` runs
``from lightning_batch.model_export import TabularPyfuncModel``. The code lives in
:mod:`lightning_batch.tracking.run_model`; this module only gives it its stable name, so models
logged by any version of lightning-batch keep loading.
"""

from lightning_batch.tracking.run_model import TabularPyfuncModel

__all__ = ["TabularPyfuncModel"]
