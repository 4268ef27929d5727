"""The command line: bad input exits 2 with one line; --json prints only JSON on stdout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from budgetpress.cli import main

CLI = [sys.executable, "-m", "budgetpress"]


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str], fragment: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budgetpress: error: "), captured.err
    assert fragment in lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("budget", "fragment"),
    [
        ("abc", "'abc'"),
        ("40%%", "40%%"),
        ("0%", "0%"),
        ("-5GiB", "-5GiB"),
        ("0.4", "40%"),
    ],
)
def test_malformed_budget(
    budget: str, fragment: str, capsys: pytest.CaptureFixture[str], micro_model_dir: Path
) -> None:
    # the = form, as a user must write it for a value that starts with '-'
    _bad(["search", "--model", str(micro_model_dir), f"--budget={budget}"], capsys, fragment)


def test_repeated_and_malformed_frontier_budgets(capsys: pytest.CaptureFixture[str], micro_model_dir: Path) -> None:
    _bad(["search", "--model", str(micro_model_dir), "--budget", "60%,60%"], capsys, "repeat a size")
    _bad(["search", "--model", str(micro_model_dir), "--budget", "60%,x"], capsys, "'x'")


def test_budget_below_smallest_plan(capsys: pytest.CaptureFixture[str], micro_model_dir: Path) -> None:
    _bad(["search", "--model", str(micro_model_dir), "--budget", "10%"], capsys, "below the smallest possible plan")


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _bad(["search", "--model", str(tmp_path / "absent"), "--budget", "35%"], capsys, "does not exist")


def test_pickle_only_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], micro_model_dir: Path) -> None:
    shutil.copy(micro_model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    _bad(["search", "--model", str(tmp_path), "--budget", "35%"], capsys, "only pickle weights")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--workload", "batch=1,ctx=9"], "ctx"),
        (["--trials", "0"], "trials"),
        (["--workers", "0"], "workers"),
        (["--strategy", "magic"], "magic"),
        (["--storage", "nosuchdb://x"], "cannot open storage"),
        (["--storage", "sqlite:////nonexistent-dir/x.db"], "cannot open storage"),
        (["--trials", "many"], "many"),
        (["--text", "/nonexistent.txt"], "nonexistent"),
        (["--space", "bits,depth"], "unknown space dimension 'depth'"),
        (["--space", ","], "at least one dimension"),
        (["--method", "bits=awq"], "unknown bits method 'awq'; accepted: rtn, gptq"),
        (["--method", "gptq"], "DIMENSION=METHOD"),
        (["--resume"], "--resume needs --study NAME"),
        (["--resume", "--study", "never-made", "--storage", "sqlite:///:memory:"], "no study 'never-made'"),
    ],
)
def test_other_bad_options(
    extra: list[str], fragment: str, capsys: pytest.CaptureFixture[str], micro_model_dir: Path
) -> None:
    _bad(["search", "--model", str(micro_model_dir), "--budget", "60%", *extra], capsys, fragment)


def test_bad_input_through_the_real_entry_point(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "search", "--budget", "lots"], capture_output=True, text=True, check=False, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "'lots'" in done.stderr


def test_model_info_json(micro_model_dir: Path) -> None:
    done = subprocess.run(
        [*CLI, "model", "info", str(micro_model_dir), "--json"], capture_output=True, text=True, check=True, timeout=120
    )
    info = json.loads(done.stdout)
    assert info["n_layers"] == 2 and info["n_params"] == 393856
    assert len(info["weights_sha256"]) == 64 and info["heldout_bits_per_byte"] > 0


def test_search_json_is_alone_on_stdout(tmp_path: Path, micro_model_dir: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'cli.db'}"
    argv = [
        *CLI,
        "search",
        "--model",
        str(micro_model_dir),
        "--budget",
        "60%",
        "--trials",
        "4",
        "--workers",
        "2",
        "--storage",
        storage,
        "--study",
        "cli-test",
        "--seed",
        "5",
        "--json",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["study"] == "cli-test" and report["storage"] == storage and report["n_trials"] == 4
    assert report["best"]["memory_bytes"] <= report["budget_bytes"] < report["dense_bytes"]
    assert report["uniform"]["memory_bytes"] <= report["budget_bytes"]
    assert {"plan_key", "kl", "ppl"} <= set(report["best"]) and report["dense"]["ppl"] > 1
    assert "trials" in done.stderr  # the progress bar went to stderr
    again = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=tmp_path, env=env, timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr
