"""Loading a model safely: the built-in one, a local transformers directory, or a hub id.

Only safetensors are ever loaded and remote code never runs: a checkpoint that would need
either is refused before anything is read, with a message that says what was found.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from budgetpress.evaluators._builtin import BUILTIN_DIR

logger = logging.getLogger(__name__)

BUILTIN_NAME = "builtin"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Config keys that make transformers import code shipped with the checkpoint or pick private kernels.
_FORBIDDEN_CONFIG_KEYS = ("auto_map", "_attn_implementation_autoset", "_attn_implementation_internal")


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded safely; the message says why and what is accepted."""


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where a model comes from: a local directory (the built-in model is one) or a hub id."""

    spec: str
    local_dir: Path | None
    hub_id: str | None

    @property
    def name(self) -> str:
        return self.spec

    @property
    def location(self) -> str:
        """What transformers' from_pretrained takes: the directory, or the hub id."""
        return str(self.local_dir) if self.local_dir is not None else str(self.hub_id)


def resolve_model(spec: str, *, model_root: Path | None = None) -> ModelSource:
    """Turn a ``--model`` value into a checked source, without loading any weights."""
    if not spec or not spec.strip():
        raise ModelLoadError("model must be 'builtin', a local transformers directory, or a hub id; got ''")
    if spec == BUILTIN_NAME:
        return ModelSource(spec=spec, local_dir=BUILTIN_DIR, hub_id=None)
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") != 1
    if looks_like_path:
        return ModelSource(spec=spec, local_dir=_check_local_dir(path, model_root), hub_id=None)
    return ModelSource(spec=spec, local_dir=None, hub_id=spec)


def _check_local_dir(path: Path, model_root: Path | None) -> Path:
    resolved = path.resolve()
    if model_root is not None and not resolved.is_relative_to(model_root.resolve()):
        raise ModelLoadError(f"model path {str(path)!r} is outside the allowed model root {str(model_root)!r}")
    if not resolved.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist; give 'builtin', a local "
            "transformers directory, or a hub id such as 'org/name'"
        )
    if not resolved.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory; give a transformers checkpoint directory")
    check_config(resolved)
    check_weight_files(resolved)
    return resolved


def check_config(directory: Path) -> dict[str, Any]:
    """Refuse a checkpoint whose config is missing, malformed, or asks for remote code."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{str(directory)!r} has no config.json; it is not a transformers checkpoint")
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{str(config_path)!r} is not valid JSON: {error}") from error
    for key in _FORBIDDEN_CONFIG_KEYS:
        if key in config:
            raise ModelLoadError(
                f"{str(config_path)!r} sets {key!r}, which would run code shipped with the "
                "checkpoint; budgetpress never runs remote code"
            )
    return config


def check_weight_files(directory: Path) -> None:
    """Require safetensors weights; a directory with only pickle files is refused, never opened."""
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{str(directory)!r} holds only pickle weights ({', '.join(pickles)}); "
            "budgetpress loads safetensors only (convert with save_pretrained(safe_serialization=True))"
        )
    raise ModelLoadError(f"{str(directory)!r} holds no *.safetensors weight files")


def load_model(source: ModelSource, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM for evaluation, safetensors only, remote code never."""
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": False}
    if source.local_dir is not None:
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline and source.hub_id else ""
        raise ModelLoadError(f"cannot load model {source.spec!r}{hint}: {error}") from error
    model.eval()
    model.requires_grad_(False)
    return model
