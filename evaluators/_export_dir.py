"""The export directory: written atomically beside its target, with a manifest that verifies it.

``staged_directory`` yields a fresh hidden directory next to the target; when the block completes
every file in it is fsynced, ``manifest.json`` (size and sha256 of every other file) is written and
fsynced, and the directory is renamed into place and its parent fsynced. A kill at any point leaves
the target absent or complete (a hidden ``.NAME.*.partial`` directory may remain beside it).
``verify_export`` checks a directory against its manifest. ``resolve_target`` confines where an
export may go: symlinks are resolved, and with a root the target must lie inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

EXPORT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = "budgetpress-export"


class ExportFormat(StrEnum):
    NATIVE = "native"
    COMPRESSED_TENSORS = "compressed-tensors"


class ExportError(ValueError):
    """An export that cannot be made: a plan the format cannot express, a bad or taken target."""


def resolve_target(out: Path | str, *, root: Path | None = None) -> Path:
    """The absolute path an export to ``out`` will occupy, checked before anything is written.

    The parent is resolved (symlinks followed) and created if missing; the last component must be a
    plain new name, never a symlink. With ``root``, the target must lie inside ``root`` once resolved.
    """
    text = str(out)
    if "\x00" in text:
        raise ExportError("export path contains a NUL byte")
    path = Path(text).expanduser()
    if path.name in ("", ".", ".."):
        raise ExportError(f"export path {text!r} must end in a directory name")
    parent = path.parent.resolve()
    target = parent / path.name
    if root is not None and not target.is_relative_to(root.resolve()):
        raise ExportError(f"export path {text!r} resolves to {str(target)!r}, outside the export root {str(root)!r}")
    if target.is_symlink():
        raise ExportError(f"export path {str(target)!r} is a symlink; give a new directory name")
    parent.mkdir(parents=True, exist_ok=True)
    if parent.resolve() != parent:
        raise ExportError(f"the parent of export path {text!r} changed while it was being checked")
    return target


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(directory: Path, *, export_format: ExportFormat, plan_key: str) -> dict[str, Any]:
    files: dict[str, Any] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.is_symlink():
            raise ExportError(f"export staging directory holds {path.name!r}, which is not a regular file")
        path.chmod(0o644)
        _fsync_path(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return {
        "format": _MANIFEST_FORMAT,
        "version": EXPORT_VERSION,
        "export_format": export_format.value,
        "plan_key": plan_key,
        "files": files,
    }


def dump_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


@contextmanager
def staged_directory(
    target: Path, *, export_format: ExportFormat, plan_key: str, overwrite: bool = False
) -> Iterator[Path]:
    """Yield a fresh hidden directory beside ``target``; on a clean exit, manifest it and rename it into place.

    On an error the staging directory is removed and ``target`` is untouched. With ``overwrite`` an
    existing export at ``target`` is replaced (moved aside, then removed once the new one is in place).
    """
    if target.exists() and not overwrite:
        raise ExportError(f"export directory {str(target)!r} already exists; choose a new one or overwrite it")
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield staging
        manifest = _manifest(staging, export_format=export_format, plan_key=plan_key)
        (staging / MANIFEST_NAME).write_bytes(dump_json(manifest))
        _fsync_path(staging / MANIFEST_NAME)
        staging.chmod(0o755)
        _fsync_path(staging)
        _move_into_place(staging, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path, *, overwrite: bool) -> None:
    old: Path | None = None
    if target.exists():
        if not overwrite or target.is_symlink() or not target.is_dir():
            raise ExportError(f"export directory {str(target)!r} appeared while exporting; not replacing it")
        old = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
        os.rename(target, old)
    os.rename(staging, target)
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old)


def verify_export(directory: Path | str) -> dict[str, Any]:
    """Check every file of an export against its manifest (sizes, sha256, nothing missing or extra).

    Returns the manifest; raises ``ExportError`` naming the first mismatch.
    """
    root = Path(directory)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ExportError(f"{str(root)!r} has no {MANIFEST_NAME}; it is not a complete budgetpress export")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("version") != EXPORT_VERSION:
        raise ExportError(f"{manifest_path} is not a {_MANIFEST_FORMAT} manifest version {EXPORT_VERSION}")
    listed = manifest.get("files", {})
    present = {p.name for p in root.iterdir()} - {MANIFEST_NAME}
    if present != set(listed):
        raise ExportError(
            f"export {str(root)!r}: files missing {sorted(set(listed) - present)}, "
            f"not in the manifest {sorted(present - set(listed))}"
        )
    for name, entry in sorted(listed.items()):
        path = root / name
        if path.is_symlink() or not path.is_file():
            raise ExportError(f"export {str(root)!r}: {name} is not a regular file")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise ExportError(f"export {str(root)!r}: {name} does not match its manifest entry (size or sha256)")
    return manifest
