"""Bad input: one line on stderr saying what is wrong and what to do, exit status 2, no run left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from lightning_batch.cli import main

from .conftest import RUN_PY, subprocess_env


def _write_csv(folder: Path, name: str, frame: pd.DataFrame) -> str:
    path = folder / name
    frame.to_csv(path, index=False)
    return str(path)


def _cases(folder: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a fragment the one-line message must contain)."""
    text_target = pd.DataFrame({"a": [1.0, 2.0, 3.0] * 10, "y": ["low", "mid", "high"] * 10})
    nan_target = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "y": [np.nan] * 4})
    tiny = pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0]})
    good = pd.DataFrame({"a": np.arange(40.0), "y": np.arange(40.0) * 2})
    (folder / "empty.csv").write_text("")
    (folder / "header_only.csv").write_text("a,y\n")
    (folder / "bad.yaml").write_text("lr: [0.1\n  batch_size: {")
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "unknown_key.yaml").write_text("learning_rate: 0.1\n")
    (folder / "notes.txt").write_text("hello")
    (folder / "space_bad_range.yaml").write_text("lr: {low: 1.0, high: 0.1}\n")
    (folder / "space_bad_name.yaml").write_text("space:\n  data: [iris, wine]\n")
    (folder / "space_log_zero.yaml").write_text("lr: {low: 0, high: 1, log: true}\n")
    (folder / "key_break.yaml").write_text('"learning\\nrate": 0.1\n')
    (folder / "space_key_break.yaml").write_text('"l\\x1cr": {low: 0.1, high: 1}\n')
    tune = ["tune", "--data", "iris", "--epochs", "1"]
    # Untrusted text with a line break in it (column and target names, paths, flags, YAML keys):
    # quoted with its escapes, so the error stays one line.
    broken_columns = pd.DataFrame({"x": np.arange(40.0), "a\nb": np.arange(40.0), "c\x85d": 1.0})
    wordy = pd.DataFrame(
        {"x": np.arange(40.0), "t\u2028e\nxt": [f"w{i}" for i in range(40)], "y": np.arange(40.0)}
    )
    huge_target = pd.DataFrame({"a": np.arange(40.0), "y": np.arange(40.0) * 1e30})
    few = pd.DataFrame({"a": np.arange(8.0), "y": np.arange(8.0)})
    return {
        "regression target too large for float32": (
            ["train", "--data", _write_csv(folder, "huge.csv", huge_target), "--target", "y"],
            "too large to train on",
        ),
        "too few rows for a 2-row validation split": (
            ["train", "--data", _write_csv(folder, "few.csv", few), "--target", "y"],
            "too few to split",
        ),
        "zero timed steps for goodput": (
            ["train", "--data", "diabetes", "--batch-size", "auto", "--min-timed-steps", "0"],
            "--min-timed-steps must be a positive integer",
        ),
        "tune: unknown sampler": (
            [*tune, "--sampler", "bayes"],
            "--sampler must be one of tpe|gp|random|grid, got 'bayes'",
        ),
        "tune: unknown pruner": (
            [*tune, "--pruner", "asha"],
            "--pruner must be one of median|hyperband|none, got 'asha'",
        ),
        "tune: more workers than trials": ([*tune, "--trials", "2", "--workers", "4"], "lower --workers"),
        "tune: zero trials": ([*tune, "--trials", "0"], "--trials must be a positive integer"),
        "tune: space range upside down": (
            [*tune, "--space", str(folder / "space_bad_range.yaml")],
            "must be below high",
        ),
        "tune: space searches the dataset": (
            [*tune, "--space", str(folder / "space_bad_name.yaml")],
            "cannot be searched",
        ),
        "tune: log range from zero": (
            [*tune, "--space", str(folder / "space_log_zero.yaml")],
            "needs low > 0",
        ),
        "tune: space file missing": ([*tune, "--space", str(folder / "none.yaml")], "not found"),
        "tune: storage not an RDB URL": ([*tune, "--storage", "redis://localhost"], "must be an RDB URL"),
        "tune: storage server down": (
            [*tune, "--storage", "postgresql://nobody@127.0.0.1:9/none"],
            "cannot open the Optuna storage",
        ),
        "tune: bad data": (["tune", "--data", "mnist"], "unknown dataset"),
        "missing file": (["train", "--data", str(folder / "nope.csv"), "--target", "y"], "not found"),
        "unknown dataset": (["train", "--data", "mnist"], "unknown dataset"),
        "cnn on data that is not square images": (
            ["train", "--data", "wine", "--model", "cnn"],
            "--model cnn needs square single-channel images",
        ),
        "cnn without channels": (
            ["train", "--data", "digits", "--model", "cnn", "--channels", "0"],
            "--channels",
        ),
        "gradient-ratio limit of 1": (
            ["train", "--data", "iris", "--grad-ratio-limit", "1"],
            "--grad-ratio-limit",
        ),
        "unsupported file type": (
            ["train", "--data", str(folder / "notes.txt"), "--target", "y"],
            "unsupported",
        ),
        "missing target column": (
            ["train", "--data", _write_csv(folder, "g.csv", good), "--target", "z"],
            "not found",
        ),
        "no --target for a file": (
            ["train", "--data", _write_csv(folder, "g2.csv", good)],
            "--target is required",
        ),
        "non-numeric regression target": (
            [
                "train",
                "--data",
                _write_csv(folder, "t.csv", text_target),
                "--target",
                "y",
                "--task",
                "regression",
            ],
            "not numeric",
        ),
        "empty file": (["train", "--data", str(folder / "empty.csv"), "--target", "y"], "empty"),
        "header only": (
            ["train", "--data", str(folder / "header_only.csv"), "--target", "y"],
            "no data rows",
        ),
        "all-NaN target": (
            ["train", "--data", _write_csv(folder, "n.csv", nan_target), "--target", "y"],
            "lacks",
        ),
        "too few rows to split": (
            ["train", "--data", _write_csv(folder, "s.csv", tiny), "--target", "y"],
            "too few",
        ),
        "batch size zero": (["train", "--data", "iris", "--batch-size", "0"], "--batch-size"),
        "batch size negative": (["train", "--data", "iris", "--batch-size", "-4"], "--batch-size"),
        "batch size text": (["train", "--data", "iris", "--batch-size", "huge"], "--batch-size"),
        "lr zero": (["train", "--data", "iris", "--lr", "0"], "--lr"),
        "lr negative": (["train", "--data", "iris", "--lr", "-0.1"], "--lr"),
        "lr not a number": (["train", "--data", "iris", "--lr", "fast"], "--lr"),
        "unknown model": (
            ["train", "--data", "iris", "--model", "transformer"],
            "--model must be one of linear|softmax|mlp|cnn, got 'transformer'",
        ),
        "unknown task": (
            ["train", "--data", "iris", "--task", "ranking"],
            "--task must be one of regression|classification, got 'ranking'",
        ),
        "model wrong for task": (["train", "--data", "iris", "--model", "linear"], "use --model softmax"),
        "unreadable YAML": (["train", "--config", str(folder / "bad.yaml")], "cannot read YAML"),
        "YAML not a mapping": (["train", "--config", str(folder / "list.yaml")], "mapping"),
        "unknown YAML key": (["train", "--config", str(folder / "unknown_key.yaml")], "unknown option"),
        "missing YAML": (["train", "--config", str(folder / "nope.yaml")], "not found"),
        "unknown flag": (["train", "--learning-rate", "0.1"], "unrecognized arguments"),
        "epochs zero": (["train", "--data", "iris", "--epochs", "0"], "--epochs"),
        "line breaks in column names": (
            ["train", "--data", _write_csv(folder, "breaks.csv", broken_columns), "--target", "z"],
            r"columns are: 'x', 'a\nb', 'c\x85d'",
        ),
        "a line separator in the target name": (
            ["train", "--data", _write_csv(folder, "g3.csv", good), "--target", "a\u2028b"],
            r"target column 'a\u2028b' not found",
        ),
        "line breaks in a text feature's name": (
            [
                "train",
                "--data",
                _write_csv(folder, "wordy.csv", wordy),
                "--target",
                "y",
                "--max-categories",
                "3",
            ],
            r"feature 't\u2028e\nxt'",
        ),
        "a line break in the data path": (
            ["train", "--data", str(folder / "no\nsuch.csv"), "--target", "y"],
            r"no\nsuch.csv';",
        ),
        "a line break in a YAML key": (
            ["train", "--config", str(folder / "key_break.yaml")],
            r"unknown option 'learning\nrate'",
        ),
        "a line break in a flag": (
            ["train", "--data", "iris", "--x\u2029y"],
            r"unrecognized arguments: --x\u2029y",
        ),
        "a line break in a --resume path": (
            ["train", "--resume", "gone\r\nlast.ckpt"],
            r"checkpoint not found: 'gone\r\nlast.ckpt'",
        ),
        "a control separator in a search-space key": (
            [*tune, "--space", str(folder / "space_key_break.yaml")],
            r"'l\x1cr' cannot be searched",
        ),
    }


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        import tempfile

        names = list(_cases(Path(tempfile.mkdtemp())).keys())
        metafunc.parametrize("case", names)


def test_bad_input_is_one_line_and_exit_2(case: str, workdir: Path, capsys: pytest.CaptureFixture):
    argv, fragment = _cases(workdir)[case]
    status = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, captured
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in captured.err + captured.out
    # nothing half-written: no run at all (the error came before a run was created)
    db = workdir / "mlruns" / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not client.search_runs(experiments), "a bad input must not leave a run behind"


def test_the_process_exit_status_is_2(workdir: Path):
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "train", "--data", "iris", "--lr", "-1"],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --lr must be above 0, got -1.0; e.g. --lr 0.01"]


def test_the_error_line_escapes_every_character_python_breaks_lines_on():
    """The CLI's backstop: whatever a message quotes raw, ``error:`` prints one line."""
    from lightning_batch.cli import one_line

    breaks = [chr(i) for i in range(0x110000) if len(f"a{chr(i)}b".splitlines()) > 1]
    assert set("\n\r\x85\u2028\u2029") <= set(breaks)
    message = one_line("start" + "".join(f"{c}x" for c in breaks) + "end")
    assert len(message.splitlines()) == 1
    assert message.startswith(r"start\nx\x0bx")


def test_an_unescaped_user_error_still_prints_one_line(workdir: Path, capsys, monkeypatch):
    import lightning_batch.cli as cli

    def raw(args):
        raise cli.UserError("column 'a\nb' and\r\nthe \u2028 rest")

    monkeypatch.setattr(cli, "run_train", raw)
    assert main(["train"]) == 2
    assert capsys.readouterr().err == "error: column 'a\\nb' and\\r\\nthe \\u2028 rest\n"
