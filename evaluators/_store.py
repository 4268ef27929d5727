"""The level store: each linear unit's packed variant at each setting, computed once and kept on disk.

Layout under ``root`` (one safetensors file per unit and setting)::

    <model_key[:16]>/<unit key>/<setting slug>.<method>.<digest[:12]>.safetensors

A file holds one packed module (``kernels.module_tensors``: its tensors, and its rebuild metadata in
the safetensors header) and, under the header key ``budgetpress.store``, the entry's full key as
JSON — model fingerprint, unit, setting, method, calibration-set id — with the bytes its tensors
hold. ``digest`` is the sha256 of that key. The calibration id is null where the setting's method
reads no calibration statistics, so such entries serve every calibration set. Files are written
under a hidden temporary name in their folder, fsynced, and renamed into place: readers see whole
entries or none, and a temporary file left by a killed writer is never read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from budgetpress.evaluators._calibration import InputStats, collect_input_stats
from budgetpress.evaluators._methods import Methods, SparsityMethod, compress_weight, pack_variant
from budgetpress.kernels import module_from_tensors, module_tensors
from budgetpress.space import LinearSetting, Plan

logger = logging.getLogger(__name__)

DEFAULT_METHODS = Methods()
STORE_KEY = "budgetpress.store"
STORE_VERSION = 1
_UNIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# The hub cache names a blob by its content hash: sha256 for LFS files, git's sha1 for small ones.
_CONTENT_HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class MissingEntryError(LookupError, ValueError):
    """The store holds no entry for a (unit, setting) that was asked for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreReport:
    """What one ``build`` did; the byte counts cover the entries it was asked for."""

    built: int
    reused: int
    seconds: float
    disk_bytes: int
    packed_bytes: int


def calibration_key(token_ids: torch.Tensor) -> str:
    """The id of a calibration set: sha256 of its shape and its token ids as int64 bytes."""
    ids = token_ids.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(f"shape={list(ids.shape)}\n".encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def model_key(model: nn.Module, *, checkpoint_dir: Path | None = None) -> str:
    """A stable fingerprint of a model as loaded: its checkpoint's content, config and dtype.

    Hashes the ``*.safetensors`` files and ``config.json`` of ``checkpoint_dir`` (default: the
    directory the model was loaded from, when that is a local directory) — a hub-cache blob by its
    file name, which is its content hash, other files once per process. Without a local checkpoint
    it hashes the config and every state-dict tensor's bytes. It fingerprints the checkpoint, not
    in-memory changes made after loading.
    """
    directory = checkpoint_dir if checkpoint_dir is not None else _checkpoint_dir(model)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    digest = hashlib.sha256(f"dtypes={dtypes}\n".encode())
    files = sorted(directory.glob("*.safetensors")) if directory is not None else []
    if directory is not None and files:
        config = directory / "config.json"
        for path in [*files, config] if config.is_file() else files:
            digest.update(f"{path.name}={_file_sha256(path)}\n".encode())
    else:
        _hash_state(digest, model)
    return digest.hexdigest()


def _checkpoint_dir(model: nn.Module) -> Path | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def _file_sha256(path: Path) -> str:
    resolved = path.resolve()
    if resolved.parent.name == "blobs" and _CONTENT_HASH.fullmatch(resolved.name):
        return resolved.name
    stat = resolved.stat()
    return _hash_file(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file; size and mtime are part of the cache key so a rewritten file is hashed again."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _hash_state(digest: Any, model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        fields = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{list(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def _method_label(methods: Methods, setting: LinearSetting) -> str:
    method = methods.for_setting(setting)
    if method is SparsityMethod.MAGNITUDE and methods.needs_stats(setting):
        # The kept weights' quantizer is part of how this entry was made.
        return f"{method.value}+{methods.bits.value}"
    return method.value


def _check_unit_name(unit_key: str) -> None:
    # Unit keys are module paths; they become folder names, so nothing may climb out of the store.
    if not _UNIT_NAME.fullmatch(unit_key) or ".." in unit_key:
        raise ValueError(f"unit key {unit_key!r} is not a module path (letters, digits, '_', '.', '-')")


class LevelStore:
    """Packed variants of one model's linear units, for one choice of methods and calibration set.

    ``build`` computes and writes what is missing; ``module`` loads an entry (once per process: loaded
    modules stay cached in memory); ``assemble_`` swaps a plan's modules into the resident model,
    keeping its original ``nn.Linear`` modules so that going back to dense costs nothing.
    ``calibration_key`` may be None when no setting's method reads calibration statistics.
    """

    def __init__(
        self, root: Path, *, model_key: str, calibration_key: str | None = None, methods: Methods = DEFAULT_METHODS
    ) -> None:
        if not re.fullmatch(r"[0-9A-Za-z_-]{16,}", model_key):
            raise ValueError(f"model_key must be a fingerprint of at least 16 letters or digits; got {model_key!r}")
        self.root = Path(root)
        self.model_key = model_key
        self.calibration_key = calibration_key
        self.methods = methods
        self._modules: dict[tuple[str, LinearSetting], nn.Module] = {}
        self._dense: dict[str, nn.Linear] = {}
        self._resident: nn.Module | None = None

    @property
    def directory(self) -> Path:
        """This model's folder in the store."""
        return self.root / self.model_key[:16]

    def entry_key(self, unit_key: str, setting: LinearSetting) -> dict[str, Any]:
        """The full key of a (unit, setting) entry, as written in its file's header."""
        stats = self.methods.needs_stats(setting)
        return {
            "version": STORE_VERSION,
            "model": self.model_key,
            "unit": unit_key,
            "setting": setting.to_dict(),
            "method": _method_label(self.methods, setting),
            "calibration": self.calibration_key if stats else None,
        }

    def path(self, unit_key: str, setting: LinearSetting) -> Path:
        """Where the (unit, setting) entry lives, whether or not it exists yet."""
        _check_unit_name(unit_key)
        if setting.is_dense:
            raise ValueError(f"unit {unit_key!r}: a dense setting has no store entry; the model's nn.Linear serves it")
        key = self.entry_key(unit_key, setting)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", setting.label()).strip("-")
        return self.directory / unit_key / f"{slug}.{key['method']}.{digest[:12]}.safetensors"

    def build(
        self,
        model: PreTrainedModel,
        units_settings: Mapping[str, Sequence[LinearSetting]],
        *,
        calibration_tokens: torch.Tensor | None = None,
        progress: bool = True,
    ) -> StoreReport:
        """Compute, pack and write every missing (unit, setting) entry; reuse those on disk.

        ``model`` must be dense at these units (their input statistics are the dense model's).
        Statistics are collected in one pass, only when a missing entry's method reads them.
        Dense settings need no entry and are skipped. A progress bar goes to stderr.
        """
        start = time.perf_counter()
        wanted = _wanted(units_settings)
        linears = {unit: _dense_linear(model, unit) for unit in units_settings}
        missing = [(unit, setting) for unit, setting in wanted if not self.path(unit, setting).is_file()]
        stats = self._stats(model, missing, calibration_tokens)
        for unit, setting in tqdm(
            missing, desc="level store", unit="variant", disable=not (progress and missing), file=sys.stderr
        ):
            self._write(unit, setting, linears[unit], stats.get(unit))
        disk = packed = 0
        for unit, setting in wanted:
            path = self.path(unit, setting)
            disk += path.stat().st_size
            packed += self._read_info(path, self.entry_key(unit, setting))
        report = StoreReport(
            built=len(missing),
            reused=len(wanted) - len(missing),
            seconds=time.perf_counter() - start,
            disk_bytes=disk,
            packed_bytes=packed,
        )
        logger.info("level store %s: %s", self.directory, report)
        return report

    def _stats(
        self, model: PreTrainedModel, missing: Sequence[tuple[str, LinearSetting]], tokens: torch.Tensor | None
    ) -> dict[str, InputStats]:
        needing = sorted({unit for unit, setting in missing if self.methods.needs_stats(setting)})
        if not needing:
            return {}
        if tokens is None or self.calibration_key is None:
            raise ValueError(
                f"methods {self.methods.to_text()} read calibration statistics for {len(needing)} units; "
                "give the store a calibration_key and build with calibration_tokens"
            )
        if calibration_key(tokens) != self.calibration_key:
            raise ValueError("calibration_tokens are not the calibration set this store's calibration_key names")
        logger.info("collecting input statistics of %d linears over %d windows", len(needing), len(tokens))
        return collect_input_stats(model, tokens, names=needing)

    def _write(self, unit: str, setting: LinearSetting, linear: nn.Linear, stats: InputStats | None) -> None:
        unit_stats = stats if self.methods.needs_stats(setting) else None
        variant = compress_weight(linear.weight, setting, methods=self.methods, stats=unit_stats)
        bias = None if linear.bias is None else linear.bias.detach()
        tensors, metadata = module_tensors(pack_variant(variant, setting, bias=bias))
        tensors = {name: tensor.to("cpu").contiguous() for name, tensor in tensors.items()}
        held = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        metadata[STORE_KEY] = json.dumps({"key": self.entry_key(unit, setting), "held_bytes": held}, sort_keys=True)
        _write_atomic(self.path(unit, setting), save_safetensors(tensors, metadata=metadata))

    def _read_info(self, path: Path, expected: Mapping[str, Any]) -> int:
        """Check an entry's header key against ``expected``; return the bytes its tensors hold."""
        return self._check_record(path, _header_info(path), expected)

    @staticmethod
    def _check_record(path: Path, record: Mapping[str, Any], expected: Mapping[str, Any]) -> int:
        if record["key"] != expected:
            raise ValueError(f"level store file {path} holds entry {record['key']}, not {dict(expected)}")
        return int(record["held_bytes"])

    def module(self, unit_key: str, setting: LinearSetting) -> nn.Module:
        """The packed module of (unit, setting), read from disk once and then served from memory."""
        cached = self._modules.get((unit_key, setting))
        if cached is None:
            cached = self._load(unit_key, setting)
            self._modules[(unit_key, setting)] = cached
        return cached

    def _load(self, unit_key: str, setting: LinearSetting) -> nn.Module:
        path = self.path(unit_key, setting)
        if self.calibration_key is None and self.methods.needs_stats(setting):
            raise ValueError(
                f"setting {setting.label()} of unit {unit_key!r} is made with calibration statistics "
                f"({_method_label(self.methods, setting)}); open the store with its calibration_key"
            )
        if not path.is_file():
            raise MissingEntryError(
                f"level store {self.directory} has no entry for unit {unit_key!r} at setting {setting.label()} "
                f"(method {_method_label(self.methods, setting)}); build the store for it first"
            )
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = dict(file.metadata() or {})
                self._check_record(path, _store_record(path, metadata), self.entry_key(unit_key, setting))
                tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        except SafetensorError as error:
            raise ValueError(f"level store file {path} is not a readable safetensors file: {error}") from error
        del metadata[STORE_KEY]
        return module_from_tensors(tensors, metadata)

    def entries(self) -> list[tuple[str, LinearSetting, Path]]:
        """Every (unit, setting, file) on disk that this store (model, methods, calibration) serves."""
        return [(unit, setting, path) for unit, setting, path, _ in self._scan()]

    def _scan(self) -> list[tuple[str, LinearSetting, Path, int]]:
        """This store's entries with their held bytes; other methods' or calibration sets' are skipped."""
        found: list[tuple[str, LinearSetting, Path, int]] = []
        for path in sorted(self.directory.glob("*/*.safetensors")):
            record = _header_info(path)
            key = record["key"]
            setting = LinearSetting.from_dict(key["setting"])
            if key == self.entry_key(key["unit"], setting) and path == self.path(key["unit"], setting):
                found.append((key["unit"], setting, path, int(record["held_bytes"])))
        return found

    def disk_bytes(self) -> int:
        """Bytes of this store's entry files on disk (tensors, headers and their metadata)."""
        return sum(path.stat().st_size for _, _, path, _ in self._scan())

    def packed_bytes(self) -> int:
        """Bytes the packed modules of this store's entries hold (what ``space.linear_bytes`` counts)."""
        return sum(held for _, _, _, held in self._scan())

    def assemble_(self, model: nn.Module, plan: Plan) -> nn.Module:
        """Swap the plan's packed modules into ``model`` (and originals back where it is dense); returns it.

        Every unit this store ever swapped out is restored to its original ``nn.Linear`` unless the
        plan compresses it, so assembling plan B after plan A gives the model B alone gives. KV
        settings are not module state and are ignored. A store serves one resident model.
        """
        if self._resident is not None and self._resident is not model:
            raise ValueError("this level store already assembles another model; a store serves one resident model")
        self._resident = model
        linear = {key: s for key, s in plan.items() if isinstance(s, LinearSetting) and not s.is_dense}
        for key in [*linear, *(key for key in self._dense if key not in linear)]:
            self._swap(model, key, linear.get(key))
        return model

    def _swap(self, model: nn.Module, key: str, setting: LinearSetting | None) -> None:
        parent_name, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_name)
        current = getattr(parent, child)
        dense = self._dense.get(key)
        if dense is None:
            dense = self._dense[key] = _dense_linear(model, key)
        target = dense if setting is None else self.module(key, setting).to(dense.weight.device)
        if current is not target:
            setattr(parent, child, target)


def _wanted(units_settings: Mapping[str, Sequence[LinearSetting]]) -> list[tuple[str, LinearSetting]]:
    wanted: list[tuple[str, LinearSetting]] = []
    for unit, settings in units_settings.items():
        _check_unit_name(unit)
        for setting in dict.fromkeys(settings):
            if not isinstance(setting, LinearSetting):
                raise ValueError(f"unit {unit!r}: the level store holds linear settings; got {setting!r}")
            if not setting.is_dense:
                wanted.append((unit, setting))
    return wanted


def _dense_linear(model: nn.Module, unit: str) -> nn.Linear:
    module = model.get_submodule(unit)
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"unit {unit!r} is a {type(module).__name__}, not the dense nn.Linear; the store reads the dense model"
        )
    return module


def _header_info(path: Path) -> dict[str, Any]:
    """The ``budgetpress.store`` record in a file's header (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"level store file {path} is not a readable safetensors file: {error}") from error
    return _store_record(path, metadata)


def _store_record(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    if STORE_KEY not in metadata:
        raise ValueError(f"{path} is not a level store entry (its header has no {STORE_KEY!r} record)")
    record: dict[str, Any] = json.loads(metadata[STORE_KEY])
    return record


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the folder is synced.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
