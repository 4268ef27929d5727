"""Check 11: untrusted models are refused before anything is loaded; nothing is ever unpickled."""

from __future__ import annotations

import json
import pickle
import shutil
import uuid
from pathlib import Path

import pytest

from budgetpress.api import ModelRefused, ServiceSettings, resolve_job_model

from .conftest import Service, job_body


class _Canary:
    """Unpickling this writes the canary file: proof that something unpickled a user's file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _checkpoint(root: Path, micro_model_dir: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(micro_model_dir, target)
    return target


def test_untrusted_models_are_refused_before_loading(
    service: Service, model_root: Path, micro_model_dir: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    tag = uuid.uuid4().hex[:6]
    pickled = _checkpoint(model_root, micro_model_dir, f"pickled-{tag}")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Canary(canary)))
    remote = _checkpoint(model_root, micro_model_dir, f"remote-{tag}")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Model"}}))
    private = _checkpoint(model_root, micro_model_dir, f"private-{tag}")
    (private / "config.json").write_text(json.dumps({**config, "_attn_implementation_internal": "x"}))
    outside = _checkpoint(tmp_path, micro_model_dir, "outside")
    try:
        for model, reason in (
            (pickled.name, "pickle"),
            (remote.name, "auto_map"),
            (private.name, "_attn_implementation_internal"),
            ("some-org/some-model", "allow-list"),
            (f"../{tmp_path.name}/outside", "outside the model root"),
            (str(outside), "absolute"),
        ):
            response = service.submit("alice", job_body(model))
            assert response.status_code == 422, model
            assert reason in response.json()["detail"], response.text
            assert str(model_root) not in response.json()["detail"].replace(model, "")  # no server paths
    finally:
        for path in (pickled, remote, private):
            shutil.rmtree(path)
    assert not canary.exists()
    assert service.client.get("/v1/jobs", headers=service.auth("alice")).json()["total"] == 0


def test_allow_list_and_model_root(model_root: Path, micro_model_dir: Path) -> None:
    settings = ServiceSettings(model_root=model_root, allowed_hub_ids=("org/allowed",))
    assert resolve_job_model("org/allowed", settings) == "org/allowed"
    assert resolve_job_model("builtin", settings) == "builtin"
    assert resolve_job_model(micro_model_dir.name, settings) == str(micro_model_dir.resolve())
    with pytest.raises(ModelRefused, match="allow-list"):
        resolve_job_model("org/other", ServiceSettings(model_root=None))
    with pytest.raises(ModelRefused):
        resolve_job_model(".", settings)
