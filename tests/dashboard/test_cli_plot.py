"""``budgetpress plot``: PNG files, and the plots attached to the study as dashboard artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from optuna.artifacts import get_all_artifact_meta

from budgetpress.cli import main
from tests.dashboard.conftest import STUDY, load


def test_plot_writes_png_and_attaches_artifacts_once(
    study_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plots" / "front.png"
    assert main(["plot", "--storage", study_db, "--study", STUDY, "--kind", "pareto", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"wrote the pareto plot of study {STUDY}" in capsys.readouterr().out
    args = ["plot", "--storage", study_db, "--study", STUDY, "--kind", "allocation", "--out", str(out), "--attach"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(result["artifacts"]) == {"pareto", "allocation"}
    assert Path(result["artifact_root"]) == tmp_path / "budgetpress.db.artifacts"
    assert main([*args, "--json"]) == 0  # attaching again keeps the artifacts the study has
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["artifacts"] == result["artifacts"]
    metas = get_all_artifact_meta(load(study_db))
    assert sorted(m.filename for m in metas) == [f"{STUDY}-allocation.png", f"{STUDY}-pareto.png"]
    assert all((Path(result["artifact_root"]) / m.artifact_id).is_file() for m in metas)


def test_plot_of_a_missing_study_is_bad_input(
    study_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["plot", "--storage", study_db, "--study", "nope", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "no study 'nope'" in capsys.readouterr().err


def test_dashboard_refuses_a_public_address_without_expose(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", "--storage", "sqlite:///unused.db", "--host", "0.0.0.0"]) == 2
    assert "binds 127.0.0.1" in capsys.readouterr().err
