"""The PNGs a finished run carries: its loss curves and how its batch size moved."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lightning_batch._extras import extra_imports


def plot_loss_curves(history: Mapping[str, list[tuple[int, float]]], path: Path) -> Path:
    """PNG of train loss per step and val loss per validation, against the optimizer step."""
    with extra_imports("tracking", "plotting"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, style in (("train_loss", dict(alpha=0.5, lw=0.8)), ("val_loss", dict(marker="o", lw=1.5))):
        points = history.get(key) or []
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=key, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if any(v > 0 for _, v in history.get("train_loss", [])):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("loss curves")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_batch_dynamics(rows: list[dict[str, float]], path: Path) -> Path:
    """PNG of batch size, learning rate and gradient noise scale against samples seen."""
    import math

    with extra_imports("tracking", "plotting"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 7), dpi=110, sharex=True)
    seen = [r["samples_seen"] for r in rows]
    for ax, key, label in (
        (axes[0], "batch_size", "batch size"),
        (axes[1], "lr", "learning rate"),
        (axes[2], "gns", "gradient noise scale B_noise"),
    ):
        points = [(x, r[key]) for x, r in zip(seen, rows, strict=True) if math.isfinite(r.get(key, math.nan))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, drawstyle="steps-post" if key != "gns" else "default", lw=1.4)
            if key != "lr" and min(ys) > 0:
                ax.set_yscale("log")
        if key == "gns":
            batch = [(x, r["batch_size"]) for x, r in zip(seen, rows, strict=True)]
            if batch:
                xs, ys = zip(*batch, strict=True)
                ax.plot(xs, ys, lw=0.8, ls="--", color="grey", label="batch size")
                ax.legend(loc="best")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("samples seen")
    axes[0].set_title("how the batch size moved")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
