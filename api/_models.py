"""Which models a job may name: the built-in one, hub ids on the allow-list, directories under the
model root. Everything is checked here, before anything is loaded: the path is resolved (symlinks
followed) and must stay under the root; the checkpoint must have a config without remote code and
safetensors weights. Nothing a user sends is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from budgetpress.api._settings import ServiceSettings
from budgetpress.evaluators import BUILTIN_NAME, ModelLoadError, resolve_model


class ModelRefused(ValueError):
    """A model name the service will not load; the message says why."""


def resolve_job_model(name: str, settings: ServiceSettings) -> str:
    """The model spec a job runs with: 'builtin', an allowed hub id, or an absolute checked directory."""
    if name == BUILTIN_NAME:
        return name
    if "\x00" in name or "\\" in name:
        raise ModelRefused(f"model name {name!r} holds a forbidden character")
    if name in settings.allowed_hub_ids:
        return name
    if settings.model_root is None:
        raise ModelRefused(
            f"model {name!r} is not 'builtin' and not on the service's hub allow-list, and no model root is configured"
        )
    return str(_local_model(name, settings.model_root))


def _local_model(name: str, model_root: Path) -> Path:
    relative = PurePosixPath(name)
    if relative.is_absolute() or name.startswith("~"):
        raise ModelRefused(f"model {name!r}: give a directory relative to the model root, not an absolute path")
    root = model_root.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or target == root:
        raise ModelRefused(f"model {name!r} is outside the model root")
    if not target.is_dir():
        raise ModelRefused(
            f"model {name!r} is not 'builtin', not on the hub allow-list, and not a directory under the model root"
        )
    try:
        source = resolve_model(str(target), model_root=root)
    except ModelLoadError as error:
        # The message would name the server's paths; say what is wrong in the user's terms.
        raise ModelRefused(f"model {name!r} refused: {_relative_message(str(error), root)}") from error
    if source.local_dir is None:
        raise ModelRefused(f"model {name!r} is not a local checkpoint directory")
    return source.local_dir


def _relative_message(message: str, root: Path) -> str:
    return message.replace(str(root) + "/", "").replace(str(root), "<model root>")
