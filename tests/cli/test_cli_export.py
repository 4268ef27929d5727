"""``budgetpress export``: a study's trial → a checkpoint directory that reloads to the trial's KL.

The studies here are recorded by the search's own ``Ledger`` from ``PlanEvaluator`` results (no
Ray), with the session record a search writes; the last test runs ``budgetpress search`` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

import budgetpress
import budgetpress.workers._job
from budgetpress.cli import main
from budgetpress.evaluators import (
    KVTokenSpec,
    SessionSpec,
    TokenSpec,
    byte_encoder,
    load_model,
    make_token_sets,
    open_session,
    profile_source,
    resolve_model,
    verify_export,
)
from budgetpress.evaluators._export_trial import open_level_store
from budgetpress.search import Ledger
from budgetpress.search._base import Outcome
from budgetpress.space import Dimension, LinearSetting, Plan, SearchSpace, Split, Workload
from budgetpress.workers import SESSION_ATTR, session_record

CLI = [sys.executable, "-m", "budgetpress"]
TOKENS = TokenSpec(seq_len=128, calibration_sequences=4, evaluation_sequences=4)
KV_TOKENS = KVTokenSpec(prefill_len=96, continuation_len=32, calibration_sequences=2, evaluation_sequences=2)
DIMENSIONS = frozenset({Dimension.BITS, Dimension.SPARSITY, Dimension.KV})


def _space() -> SearchSpace:
    profile = profile_source(resolve_model("builtin"))
    return SearchSpace.for_dimensions(profile, DIMENSIONS, context=512)


def _plans(space: SearchSpace) -> list[Plan]:
    """A mixed plan over every dimension (trial 0) and a 4-bit plan compressed-tensors can express (trial 1)."""
    groups = [name for name, _ in space.groups()]
    mixed = space.plan_from_choices({g: (3 * i + 1) % len(space.choices(g)) for i, g in enumerate(groups)})
    four = LinearSetting(bits=4, group_size=128)
    portable = Plan({k: four for k, s in mixed.items() if isinstance(s, LinearSetting) and not k.endswith("up_proj")})
    return [mixed, portable]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[float]]:
    """A study of two evaluated trials, recorded as a search records them."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export-cli")
    spec = SessionSpec(
        model="builtin",
        workload=Workload(context=512),
        tokens=TOKENS,
        kv_tokens=KV_TOKENS,
        store_root=str(root / "store"),
        methods="bits=rtn,sparsity=magnitude,rank=svd",
    )
    space = _space()
    plans = _plans(space)
    model = load_model(resolve_model("builtin"))
    wanted: dict[str, list[LinearSetting]] = {}
    for plan in plans:
        for key, setting in plan.items():
            if isinstance(setting, LinearSetting) and not setting.is_dense:
                wanted.setdefault(key, []).append(setting)
    calibration = make_token_sets(TOKENS, byte_encoder).calibration
    open_level_store(spec, model, calibration).build(model, wanted, calibration_tokens=calibration, progress=False)
    evaluator = open_session(spec).evaluator
    storage = f"sqlite:///{root / 'study.db'}"
    recorded = optuna.create_study(storage=storage, study_name="cli-export", direction="minimize")
    recorded.set_user_attr(SESSION_ATTR, session_record(spec))
    ledger = Ledger(study=recorded, space=space, budget_bytes=10**9)
    kls = []
    for plan in plans:
        result = evaluator.evaluate(plan, split=Split.CALIBRATION, max_tokens=256)
        trial = ledger.open(plan, memory_bytes=result.memory_bytes, strategy="test", fidelity=256)
        ledger.close(trial, Outcome(result=result))
        kls.append(result.kl)
    return storage, "cli-export", kls


def _export(argv: list[str]) -> dict[str, object]:
    done = subprocess.run([*CLI, "export", *argv, "--json"], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result: dict[str, object] = json.loads(lines[0])
    return result


def test_native_export_of_a_trial_reloads_to_its_kl(study: tuple[str, str, list[float]], tmp_path: Path) -> None:
    storage, name, kls = study
    result = _export(["--storage", storage, "--study", name, "--trial", "0", "--out", str(tmp_path / "native")])
    assert result["trial"] == 0 and result["format"] == "native"
    assert result["reloaded_kl"] == result["evaluated_kl"] == kls[0]  # the same arithmetic, bit for bit
    assert abs(float(result["disk_ratio"]) - 1) < 0.05  # type: ignore[arg-type]
    assert verify_export(tmp_path / "native")["plan_key"] == result["plan_key"]
    model = budgetpress.load_compressed(tmp_path / "native")
    plan = Plan.from_json((tmp_path / "native" / "plan.json").read_text())
    assert model.budgetpress_plan == plan and any(k.startswith("kv.") for k in plan)
    ids = torch.tensor([list(b"import os\n")])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, len(ids[0]) + 4)


def test_compressed_tensors_export_of_a_trial(study: tuple[str, str, list[float]], tmp_path: Path) -> None:
    storage, name, kls = study
    out = tmp_path / "ct"
    result = _export(["--storage", storage, "--study", name, "--trial", "1", "--out", str(out), "--format",
                      "compressed-tensors"])  # fmt: skip
    assert result["format"] == "compressed-tensors"
    assert result["reloaded_kl"] == pytest.approx(kls[1], rel=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)


def test_best_is_the_default_trial(study: tuple[str, str, list[float]], tmp_path: Path) -> None:
    storage, name, kls = study
    assert main(["export", "--storage", storage, "--study", name, "--out", str(tmp_path / "b"), "--no-verify"]) == 0
    record = json.loads((tmp_path / "b" / "budgetpress.json").read_text())
    assert record["provenance"]["trial"] == kls.index(min(kls))


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str], fragment: str) -> None:
    assert main(["export", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("budgetpress: error: ") and fragment in lines[-1], captured.err
    assert "Traceback" not in captured.err


def test_bad_exports_exit_2_with_one_line(
    study: tuple[str, str, list[float]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage, name, _ = study
    base = ["--storage", storage, "--study", name]
    _bad([*base, "--trial", "0", "--out", str(tmp_path / "x"), "--format", "compressed-tensors"], capsys, "kv.")
    _bad([*base, "--trial", "7", "--out", str(tmp_path / "x")], capsys, "has trials 0..1")
    _bad([*base, "--trial", "first", "--out", str(tmp_path / "x")], capsys, "'best' or a trial number")
    _bad(["--storage", storage, "--study", "nope", "--out", str(tmp_path / "x")], capsys, "no study 'nope'")
    _bad([*base, "--out", str(tmp_path / "x"), "--format", "onnx"], capsys, "invalid choice")
    (tmp_path / "taken").mkdir()
    _bad([*base, "--trial", "1", "--out", str(tmp_path / "taken")], capsys, "already exists")
    assert not (tmp_path / "x").exists() and list((tmp_path / "taken").iterdir()) == []
    empty = optuna.create_study(storage=storage, study_name="empty")
    _bad(["--storage", storage, "--study", "empty", "--out", str(tmp_path / "x")], capsys, "no feasible complete trial")
    empty.add_trial(optuna.load_study(storage=storage, study_name=name).trials[1])  # a trial, but no session record
    _bad(
        ["--storage", storage, "--study", "empty", "--out", str(tmp_path / "x")], capsys, "does not record its session"
    )


def test_export_after_a_real_search(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BUDGETPRESS_STORE": str(tmp_path / "store")}
    search = [*CLI, "search", "--model", "builtin", "--budget", "40%", "--trials", "4", "--strategy", "uniform"]
    search += ["--method", "bits=rtn", "--storage", storage, "--study", "s", "--workers", "1", "--json"]
    done = subprocess.run(search, capture_output=True, text=True, check=False, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "best"
    export = [*CLI, "export", "--storage", storage, "--study", "s", "--out", str(out), "--json"]
    done = subprocess.run(export, capture_output=True, text=True, check=False, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reloaded_kl"] == result["evaluated_kl"]
    assert abs(result["disk_ratio"] - 1) < 0.05
    verify_export(out)
