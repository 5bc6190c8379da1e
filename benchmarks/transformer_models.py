"""DynamicBatchSize on transformers: what a measured step costs, and time to a target on a language model.

Two benchmarks, each printing a table and writing JSON under ``benchmarks/results/``:

``overhead``
    A measured step's cost against an unmeasured one, for Lightning's demo Transformer
    (``lightning.pytorch.demos.Transformer``, sequence-to-sequence on generated tokens) and a tiny
    HuggingFace BERT for sequence classification (dict batches with padding). A step is the
    forward, the backward and the NoiseMeter's calls as the callback makes them; measured and
    unmeasured steps alternate in one process, and the report gives medians and their ratio.

``lm``
    Time to a target validation loss on a small language-model task: the demo Transformer (its
    forward made causal: see ``CausalTransformer``) learning a random Markov chain over 32 tokens
    (sequences of 24). The best achievable loss is the chain's
    entropy rate, computed from its transition matrix; the target is that plus 0.03 nats. Methods,
    through Lightning with SGD: every fixed (B, lr) of a grid, and ``auto``
    (``DynamicBatchSize()`` at its defaults) from B0=8 with the lr that was best at B=8 in the grid
    of the first seed (what a user who tuned at a small batch would start from). The clock runs
    from the fit's set-up (the memory probe counts) and pauses while the validation loss is
    evaluated, every tenth of an epoch of rows. Three seeds (initial weights and shuffling); the
    report gives each method's median seconds to the target (a miss counts as +inf) and ``auto``
    against the best fixed configuration of each seed.

``adamw``
    The same task with AdamW, where the noise that matters is that of Adam's preconditioned step:
    ``DynamicBatchSize(noise_gradients=...)`` measuring the ``raw`` and the ``preconditioned``
    noise scale side by side, each from B0=8 with the lr best at B=8, against every fixed (B, lr)
    of an AdamW grid. Same clock, seeds and report as ``lm``, plus preconditioned / raw per seed.

Run::

    python benchmarks/transformer_models.py overhead
    python benchmarks/transformer_models.py lm --seeds 0 1 2
    python benchmarks/transformer_models.py adamw --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import TargetClock, training_only_trainer  # noqa: E402
from lightning_batch import DynamicBatchSize  # noqa: E402
from lightning_batch.plugin.noise import NoiseMeter  # noqa: E402
from lightning_batch.plugin.preconditioner import Preconditioner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, BLOCK = 32, 24
GRID_BATCHES = (8, 32, 128)
GRID_LRS = (0.1, 0.3, 1.0)
ADAMW_LRS = (0.003, 0.01, 0.03)
TARGET_MARGIN = 0.03  # nats above the chain's entropy rate


# -- the data -------------------------------------------------------------------------------------------


class MarkovTokens(Dataset):
    """Sequences from one random Markov chain (fixed by ``chain_seed``); ``rows`` drawn with ``seed``."""

    def __init__(self, rows: int, seed: int, chain_seed: int = 0) -> None:
        chain = torch.Generator().manual_seed(chain_seed)
        self.transitions = torch.softmax(2.5 * torch.randn(VOCAB, VOCAB, generator=chain), dim=-1)
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.zeros(rows, BLOCK + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (rows,), generator=generator)
        for t in range(BLOCK):
            tokens[:, t + 1] = torch.multinomial(
                self.transitions[tokens[:, t]], 1, generator=generator
            ).squeeze(1)
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]

    def best_loss(self) -> float:
        """The lowest expected loss any model can reach: -log T[current, next], averaged over the tokens."""
        current, following = self.tokens[:, :-1], self.tokens[:, 1:]
        return float(-self.transitions[current, following].log().mean())


class CausalTransformer(Transformer):
    """The demo Transformer as a causal language model: its forward feeds the target sequence to the
    decoder and masks neither the encoder nor the cross-attention, so position t sees token t + 1
    (a copy task, loss near 0). Here encoder and decoder both read the inputs, every attention masked
    to the past: predicting token t + 1 from tokens up to t."""

    def forward(self, inputs: Tensor, target: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        causal = self.generate_square_subsequent_mask(inputs.shape[1]).to(inputs.device)
        x = self.pos_encoder(self.embedding(inputs) * math.sqrt(self.ninp))
        output = self.transformer(x, x, src_mask=causal, tgt_mask=causal, memory_mask=causal)
        return nn.functional.log_softmax(self.decoder(output), dim=-1).view(-1, self.vocab_size)


class DemoLM(LightningTransformer):
    """Lightning's demo module with a smaller demo Transformer, causal; the lr as given; no download."""

    def __init__(self, lr: float, optimizer: str = "sgd") -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = CausalTransformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0)
        self.lr, self.optimizer = lr, optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def prepare_data(self) -> None:
        pass

    def val_loss(self, data: MarkovTokens) -> float:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            x, y = data.tokens[:, :-1], data.tokens[:, 1:]
            loss = float(nn.functional.nll_loss(self(x, y), y.reshape(-1)))
        self.train(was_training)
        return loss


class ClockCallback(pl.Callback):
    """Drives a TargetClock from the fit (started at the callbacks' set-up, so the probe counts)."""

    def __init__(self, clock: TargetClock, val: MarkovTokens) -> None:
        self.clock, self.val = clock, val

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.clock.after_step(len(batch[0]), lambda: pl_module.val_loss(self.val)):
            trainer.should_stop = True


def fit_to_target(
    train: MarkovTokens,
    val: MarkovTokens,
    batch: int,
    lr: float,
    seed: int,
    target: float,
    cap_s: float,
    auto: bool,
    optimizer: str = "sgd",
    noise_gradients: str = "auto",
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    module = DemoLM(lr, optimizer)
    clock = TargetClock(len(train), target, cap_s)
    callbacks: list[pl.Callback] = [ClockCallback(clock, val)]
    resize = DynamicBatchSize(noise_gradients=noise_gradients) if auto else None
    if resize is not None:
        callbacks.insert(0, resize)
    loader = DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    training_only_trainer(callbacks=callbacks).fit(module, loader)
    reached = next(((s, rows) for s, rows, loss in clock.points if loss <= target), None)
    return {
        "method": (f"auto ({noise_gradients})" if noise_gradients != "auto" else "auto")
        if auto
        else f"B={batch}, lr={lr:g}",
        "seed": seed,
        "batch_size": batch,
        "lr": lr,
        "seconds": reached[0] if reached else None,
        "samples": reached[1] if reached else None,
        "lowest_loss": min((p[2] for p in clock.points if math.isfinite(p[2])), default=None),
        "final_batch": resize.batch_size if resize else batch,
        "sizes": sorted({d["to"] for d in resize.decisions}) if resize else [batch],
        "measured_fraction": resize.measurement.measured_fraction if resize else None,
    }


def lm(
    seeds: list[int], cap_s: float, optimizer: str = "sgd", autos: tuple[str, ...] = ("auto",)
) -> dict[str, Any]:
    """Every fixed (B, lr) of the grid and ``DynamicBatchSize`` with each ``noise_gradients`` of ``autos``."""
    lrs = ADAMW_LRS if optimizer == "adamw" else GRID_LRS
    train, val = MarkovTokens(8192, seed=100), MarkovTokens(1024, seed=101)
    target = val.best_loss() + TARGET_MARGIN
    print(f"entropy rate {val.best_loss():.4f} nats, target {target:.4f}", flush=True)
    runs: list[dict[str, Any]] = []
    lr0: float | None = None
    for seed in seeds:
        grid = []
        for batch in GRID_BATCHES:
            for lr in lrs:
                run = fit_to_target(train, val, batch, lr, seed, target, cap_s, False, optimizer)
                grid.append(run)
                print(
                    json.dumps({k: run[k] for k in ("method", "seed", "seconds", "lowest_loss")}), flush=True
                )
        if lr0 is None:  # the lr a user tuned at the smallest batch, in the first seed
            small = [r for r in grid if r["batch_size"] == GRID_BATCHES[0]]
            lr0 = min(
                small, key=lambda r: (r["seconds"] is None, r["seconds"] or 0, r["lowest_loss"] or math.inf)
            )["lr"]
        runs += grid
        for gradients in autos:
            auto = fit_to_target(
                train, val, GRID_BATCHES[0], lr0, seed, target, cap_s, True, optimizer, gradients
            )
            print(
                json.dumps({k: auto[k] for k in ("method", "seed", "seconds", "lowest_loss", "sizes")}),
                flush=True,
            )
            runs.append(auto)
    return {
        "optimizer": optimizer,
        "target": target,
        "entropy_rate": val.best_loss(),
        "lr0": lr0,
        "cap_s": cap_s,
        "runs": runs,
    }


def lm_table(report: dict[str, Any]) -> None:
    runs = report["runs"]
    seeds = sorted({r["seed"] for r in runs})

    def median(values: list[float | None]) -> float | None:
        value = statistics.median([math.inf if v is None else v for v in values])
        return None if math.isinf(value) else value

    methods = sorted({r["method"] for r in runs}, key=lambda m: (m.startswith("auto"), m))
    print(f"\ntarget {report['target']:.4f} nats (entropy rate + {TARGET_MARGIN}); lr0 {report['lr0']}")
    print(f"{'method':<20} {'median s':>9} {'reached':>8}")
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        m = median([r["seconds"] for r in mine])
        print(
            f"{method:<20} {f'{m:.1f}' if m is not None else 'missed':>9} {sum(r['seconds'] is not None for r in mine):>5}/{len(mine)}"
        )
    autos = [m for m in methods if m.startswith("auto")]
    ratios: dict[str, list[float]] = {m: [] for m in autos}
    for seed in seeds:
        fixed = [
            r["seconds"]
            for r in runs
            if r["seed"] == seed and not r["method"].startswith("auto") and r["seconds"]
        ]
        for method in autos:
            auto = next(r for r in runs if r["seed"] == seed and r["method"] == method)
            if fixed and auto["seconds"]:
                ratios[method].append(auto["seconds"] / min(fixed))
            print(
                f"seed {seed}: {method} {auto['seconds']} s (batches {auto['sizes']}), "
                f"best fixed {min(fixed) if fixed else None} s"
            )
    for method, mine in ratios.items():
        if mine:
            print(
                f"{method} / best fixed of each seed: median {statistics.median(mine):.2f} "
                f"({', '.join(f'{r:.2f}' for r in mine)})"
            )
    report["auto_over_best_fixed"] = ratios.get("auto", [])
    if "auto (raw)" in ratios and "auto (preconditioned)" in ratios:
        side_by_side = []
        for seed in seeds:
            raw, pre = (
                next(r["seconds"] for r in runs if r["seed"] == seed and r["method"] == m)
                for m in ("auto (raw)", "auto (preconditioned)")
            )
            side_by_side.append(pre / raw if pre and raw else None)
        print(f"preconditioned / raw seconds of each seed: {side_by_side}")
        report["preconditioned_over_raw"] = side_by_side
        report["auto_over_best_fixed_by_method"] = ratios


# -- a measured step's cost ----------------------------------------------------------------------------------


def _tiny_bert() -> tuple[nn.Module, Any]:
    import transformers

    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=128,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config), transformers


def _bert_batch(rows: int, width: int = 64) -> dict[str, Tensor]:
    lengths = torch.randint(width // 2, width + 1, (rows,))
    ids = torch.randint(3, 1000, (rows, width))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(2, (rows,))}


def step_seconds(
    model: nn.Module, batch: Any, loss_of: Any, repeats: int, preconditioned: bool = False
) -> dict[str, float]:
    """Medians of alternating unmeasured and measured steps (forward, backward, the meter's calls);
    ``preconditioned``: the noise of gradients divided by an AdamW's √v̂ + ε (state from one step)."""
    params = dict(model.named_parameters())
    weights = None
    if preconditioned:
        adamw = torch.optim.AdamW(params.values(), lr=0.0)  # lr 0: the state, the weights unchanged
        loss_of(model, batch).backward()
        adamw.step()
        model.zero_grad(set_to_none=True)
        weights = Preconditioner(params, [adamw]).weights
    meter = NoiseMeter(params, module=model, preconditioner=weights)
    times: dict[bool, list[float]] = {False: [], True: []}
    rows = len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
    for i in range(2 * repeats + 4):
        measure = i % 2 == 1
        start = time.perf_counter()
        meter.begin_step(measure, batch)
        loss = loss_of(model, batch)
        meter.before_backward()
        loss.backward()
        meter.after_backward()
        meter.before_optimizer_step()
        meter.estimate(rows)
        meter.end_step()
        model.zero_grad(set_to_none=True)
        if i >= 4:  # warm-up first
            times[measure].append(time.perf_counter() - start)
    meter.remove()
    plain, measured = statistics.median(times[False]), statistics.median(times[True])
    return {
        "unmeasured_ms": 1e3 * plain,
        "measured_ms": 1e3 * measured,
        "ratio": measured / plain,
        "measured_fraction": meter.measured_fraction or 0.0,
        # what the 2% budget makes of it: steps between measurements
        "steps_between_at_2pct": max(1.0, (measured - plain) / plain / 0.02),
    }


def overhead(repeats: int) -> list[dict[str, Any]]:
    rows = []
    torch.manual_seed(0)
    demo = Transformer(vocab_size=VOCAB, ninp=64, nhead=2, nhid=128, nlayers=2, dropout=0.1)
    data = MarkovTokens(256, seed=0)

    def demo_loss(model, batch):
        return nn.functional.nll_loss(model(batch[0], batch[1]), batch[1].reshape(-1))

    bert, _ = _tiny_bert()

    def bert_loss(model, batch):
        return model(**batch).loss

    models = [
        ("demo Transformer", demo, lambda b: (data.tokens[:b, :-1], data.tokens[:b, 1:]), demo_loss),
        ("tiny BERT", bert, _bert_batch, bert_loss),
    ]
    for name, model, batch_of, loss_of in models:
        for b in (16, 64):
            for pre in (False, True):
                gradients = "preconditioned" if pre else "raw"
                timing = step_seconds(model, batch_of(b), loss_of, repeats, pre)
                rows.append({"model": name, "batch": b, "gradients": gradients, **timing})
                print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'model':<18} {'B':>4} {'gradients':>15} {'unmeasured ms':>14} {'measured ms':>12} {'ratio':>6} {'exact':>6}"
    )
    for r in rows:
        print(
            f"{r['model']:<18} {r['batch']:>4} {r['gradients']:>15} {r['unmeasured_ms']:>14.1f} "
            f"{r['measured_ms']:>12.1f} {r['ratio']:>6.2f} {r['measured_fraction']:>6.3f}"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--repeats", type=int, default=30)
    t = sub.add_parser("lm")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--cap", type=float, default=90.0, help="seconds a run may take to reach the target")
    a = sub.add_parser("adamw")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--cap", type=float, default=90.0, help="seconds a run may take to reach the target")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    RESULTS.mkdir(exist_ok=True)
    if args.command == "overhead":
        result: Any = overhead(args.repeats)
    elif args.command == "adamw":
        result = lm(args.seeds, args.cap, "adamw", ("raw", "preconditioned"))
        lm_table(result)
    else:
        result = lm(args.seeds, args.cap)
        lm_table(result)
    (RESULTS / f"transformer_models_{args.command}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
