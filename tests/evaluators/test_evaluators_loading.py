"""Model specs are checked before anything is loaded; unsafe checkpoints are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from budgetpress.evaluators import ModelLoadError, load_model, profile_model, resolve_model


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_pickle_only_directory_is_refused_without_loading(tmp_path: Path, micro_model_dir: Path) -> None:
    shutil.copy(micro_model_dir / "config.json", tmp_path / "config.json")
    canary = tmp_path / "canary"
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened " + str(canary).encode())
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        resolve_model(str(tmp_path))
    assert not canary.exists()


def test_auto_map_config_is_refused(tmp_path: Path, micro_model_dir: Path) -> None:
    shutil.copytree(micro_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="auto_map"):
        resolve_model(str(tmp_path / "m"))


def test_path_outside_model_root_is_refused(tmp_path: Path, micro_model_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ModelLoadError, match="outside the allowed model root"):
        resolve_model(str(root / ".." / ".." / micro_model_dir.name), model_root=root)
    with pytest.raises(ModelLoadError, match="outside"):
        resolve_model(str(micro_model_dir), model_root=root)


def test_profile_of_micro_model(micro_model_dir: Path) -> None:
    model = load_model(resolve_model(str(micro_model_dir)))
    profile = profile_model(model, name="micro")
    assert profile.n_layers == 2
    assert len(profile.linear_units) == 14
    assert {u.role for u in profile.linear_units} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    linear = sum(u.n_params for u in profile.linear_units)
    assert linear + profile.other_params == sum(p.numel() for p in model.parameters())
    assert profile.kv_units[0].n_kv_heads == 2 and profile.kv_units[0].head_dim == 64


def test_hub_id_is_a_hub_source() -> None:
    source = resolve_model("org/name")
    assert source.hub_id == "org/name" and source.local_dir is None
