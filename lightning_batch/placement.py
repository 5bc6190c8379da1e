"""Where a run trains: accelerator, devices, strategy, nodes and precision, checked before it starts.

:func:`resolve_placement` turns a config's ``--accelerator``, ``--devices``, ``--strategy``,
``--num-nodes`` and ``--precision`` into a :class:`Placement`: the Trainer's keyword arguments,
with ``auto`` resolved against what torch sees on this machine. An impossible combination (a GPU
asked for where torch sees none, bf16 where the GPU lacks it, DDP with one process, more GPUs than
there are) is one :class:`UserError` line, raised before any data is read or MLflow run exists.

Lightning would find most of these too, but later (after the data is read and the run created)
and in several lines of its own; the checks here are cheap and say what to pass instead.

Examples:
    >>> from lightning_batch.config import RunConfig
    >>> placement = resolve_placement(RunConfig(accelerator="cpu", devices=2, strategy="ddp"))
    >>> placement.trainer_options()["strategy"], placement.world_size
    ('ddp', 2)
    >>> resolve_placement(RunConfig(accelerator="cpu", strategy="ddp"))
    Traceback (most recent call last):
    ...
    lightning_batch.errors.UserError: --strategy ddp needs more than one process; pass --devices 2 (or more), or --strategy auto
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

import torch

from lightning_batch.errors import UserError
from lightning_batch.plugin.checks import FLAG
from lightning_batch.plugin.options import check_options

#: Environment variables that tell a process which node it is (Lightning's own, torchelastic's, SLURM's).
NODE_RANK_VARIABLES = ("NODE_RANK", "GROUP_RANK", "SLURM_NODEID")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def gpu_count() -> int:
    """CUDA devices torch sees (0 without CUDA), honouring ``CUDA_VISIBLE_DEVICES``."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus() -> list[str]:
    """The GPUs torch sees, as ``CUDA_VISIBLE_DEVICES`` entries a child process can be given.

    Without ``CUDA_VISIBLE_DEVICES`` they are ``0 .. n-1``. With it they are the first n of its
    entries (indices or UUIDs), so a child given one of them sees the same physical device.
    """
    count = gpu_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


@dataclass(frozen=True)
class Placement:
    """A resolved placement: every field is concrete (no ``auto`` left but Lightning's own strategy)."""

    accelerator: str  # cpu | gpu | mps
    devices: int  # processes (or devices) per node
    strategy: str  # auto | ddp | ddp_spawn
    num_nodes: int
    precision: str

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def trainer_options(self) -> dict[str, Any]:
        """Keyword arguments for ``lightning.pytorch.Trainer``."""
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "strategy": self.strategy,
            "num_nodes": self.num_nodes,
            "precision": self.precision,
        }

    def tags(self) -> dict[str, str]:
        """What the run trained on, for MLflow tags: device name and count, torch and CUDA versions."""
        if self.accelerator == "gpu":
            name = torch.cuda.get_device_name(0)
        elif self.accelerator == "mps":
            name = "Apple MPS"
        else:
            name = _cpu_name()
        return {
            "device_name": name,
            "device_count": str(self.world_size),
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda or "none",
        }


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def resolve_placement(cfg: Any) -> Placement:
    """Check ``cfg``'s placement options against this machine; resolve ``auto``. Raises :class:`UserError`.

    ``cfg`` needs ``accelerator``, ``devices``, ``strategy``, ``num_nodes`` and ``precision``
    (a :class:`~lightning_batch.config.RunConfig`).
    """
    # The options' own declared checks: this is also called on configs that skipped validate().
    given = check_options(cfg, FLAG, names=("accelerator", "devices", "strategy", "num_nodes", "precision"))
    accelerator = given["accelerator"]
    gpus = gpu_count()
    if accelerator == "auto":
        accelerator = "gpu" if gpus else ("mps" if _mps_available() else "cpu")
    elif accelerator == "gpu" and not gpus:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise UserError(
            f"--accelerator gpu, but torch sees no GPU (torch {torch.__version__}, built {built}); "
            "use --accelerator cpu, or install a CUDA build of torch on a machine with a GPU"
        )
    elif accelerator == "mps" and not _mps_available():
        raise UserError("--accelerator mps, but this machine has no Apple MPS device; use --accelerator cpu")

    devices = _devices(given["devices"], accelerator, gpus)
    num_nodes = given["num_nodes"]
    world = devices * num_nodes

    strategy = given["strategy"]
    if strategy in ("ddp", "ddp_spawn") and world == 1:
        raise UserError(
            f"--strategy {strategy} needs more than one process; pass --devices 2 (or more), or --strategy auto"
        )
    if strategy == "auto" and world > 1:
        strategy = "ddp"  # Lightning's choice too, said out loud so the run's params show it
    if accelerator == "mps" and world > 1:
        raise UserError("MPS trains on one device; use --devices 1 with --accelerator mps")
    if num_nodes > 1 and not any(os.environ.get(v) for v in NODE_RANK_VARIABLES):
        raise UserError(
            f"--num-nodes {num_nodes} needs each node started with NODE_RANK, MASTER_ADDR and MASTER_PORT "
            "set (see the docs' guide 'GPUs, DDP and several machines'); NODE_RANK is not set here"
        )

    precision = _precision(given["precision"], accelerator)
    return Placement(accelerator, devices, strategy, num_nodes, precision)


def _devices(value: int | str, accelerator: str, gpus: int) -> int:
    if value == "auto":
        return gpus if accelerator == "gpu" else 1
    assert isinstance(value, int)
    if accelerator == "gpu" and value > gpus:
        raise UserError(
            f"--devices {value}, but torch sees {gpus} GPU{'s' if gpus != 1 else ''}; "
            f"pass --devices {gpus} (or auto)"
        )
    return value


def _precision(value: str, accelerator: str) -> str:
    if value == "16-mixed" and accelerator != "gpu":
        raise UserError(
            f"--precision 16-mixed needs a CUDA GPU (float16 autocast with a gradient scaler); on {accelerator} "
            "use --precision bf16-mixed or 32-true"
        )
    if value == "bf16-mixed" and accelerator == "gpu" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"--precision bf16-mixed, but {torch.cuda.get_device_name(0)} has no bfloat16 support; "
            "use --precision 16-mixed"
        )
    if value != "32-true" and accelerator == "mps":
        raise UserError("mixed precision on MPS is not supported here; use --precision 32-true")
    return value
