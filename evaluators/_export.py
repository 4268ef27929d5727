"""Exporting a packed model as a checkpoint directory, atomically, and loading the native format back.

Two formats (``ExportFormat``):

* ``native`` — every dimension (bits, sparsity, rank, KV settings). The directory holds
  ``model.safetensors`` (the packed modules' tensors exactly as the kernels hold them, under their
  state-dict names, e.g. ``model.layers.0.mlp.up_proj.qweight``; everything else at the source's 16-bit
  dtype), ``config.json``, ``plan.json`` (the plan's canonical JSON), ``budgetpress.json`` (the export
  record: dtypes, memory-model figures, provenance) and the source's tokenizer files.
  ``load_compressed(DIR)`` rebuilds the model on our kernels, with the plan's KV cache wired into
  ``generate``.
* ``compressed-tensors`` — see ``_compressed_tensors``: plain ``AutoModelForCausalLM.from_pretrained``.

Both are written through ``_export_dir.staged_directory`` (RELIABILITY.md, atomic export: a hidden
directory beside the target, fsynced files, a sha256 manifest, one rename). Nothing in the files
depends on the time or the path written to (the safetensors header holds one metadata key, as its
map is written in no fixed order), so exporting the same plan twice gives the same manifest.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from budgetpress.evaluators._export_dir import (
    EXPORT_VERSION,
    MANIFEST_NAME,
    ExportError,
    ExportFormat,
    dump_json,
    file_sha256,
    resolve_target,
    staged_directory,
    verify_export,
)
from budgetpress.evaluators._inspect import profile_model
from budgetpress.evaluators._loading import check_config
from budgetpress.kernels import (
    LowRankLinear,
    PlanKVCache,
    QuantLinear,
    SparseLinear,
    module_from_tensors,
    module_tensors,
    use_plan_kv_attention_,
)
from budgetpress.space import KVSetting, LinearSetting, ModelProfile, Plan, Workload, plan_memory

logger = logging.getLogger(__name__)

RECORD_NAME = "budgetpress.json"
PLAN_NAME = "plan.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NATIVE_FORMAT = "budgetpress-native"
# The header's one metadata key: safetensors writes its metadata map in no fixed order, so several keys
# would make the same export's bytes (and manifest) differ from run to run.
_HEADER_KEY = "budgetpress"
PLAN_ATTR = "budgetpress_plan"
# Tokenizer and generation files copied from the source checkpoint (never pickles, never code).
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
_STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_COMPUTE_DTYPES = {"float32": torch.float32, **_STORAGE_DTYPES}
PackedModule = QuantLinear | SparseLinear | LowRankLinear


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportedFile:
    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportReport:
    """What an export wrote: its files, and its weight bytes beside the memory model's."""

    directory: str
    format: ExportFormat
    plan_key: str
    files: tuple[ExportedFile, ...]
    manifest_sha256: str
    weight_bytes_on_disk: int
    memory_model_weight_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def disk_ratio(self) -> float:
        """Weight file bytes over the memory model's weight bytes (linear units plus everything else)."""
        return self.weight_bytes_on_disk / self.memory_model_weight_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "format": self.format.value,
            "plan_key": self.plan_key,
            "files": {f.name: {"bytes": f.bytes, "sha256": f.sha256} for f in self.files},
            "manifest_sha256": self.manifest_sha256,
            "weight_bytes_on_disk": self.weight_bytes_on_disk,
            "memory_model_weight_bytes": self.memory_model_weight_bytes,
            "disk_ratio": round(self.disk_ratio, 6),
            "notes": list(self.notes),
        }


# -- what a packed model holds -----------------------------------------------------------------------------------


def packed_units(model: nn.Module, plan: Plan) -> dict[str, PackedModule]:
    """The packed module of every linear unit the plan compresses; checks each against its setting.

    Units the plan leaves dense must still be ``nn.Linear``: an export writes the model as the plan
    describes it, never a model assembled for another plan.
    """
    packed: dict[str, PackedModule] = {}
    for key, setting in plan.items():
        if not isinstance(setting, LinearSetting):
            continue
        module = model.get_submodule(key)
        if setting.is_dense:
            if not isinstance(module, nn.Linear):
                raise ExportError(f"unit {key!r} is dense in the plan but the model holds a {type(module).__name__}")
            continue
        if not isinstance(module, PackedModule):
            raise ExportError(
                f"unit {key!r} ({setting.label()}) is a {type(module).__name__} in the model; assemble the plan's "
                "packed modules first (LevelStore.assemble_ or apply_plan_)"
            )
        _check_setting(key, module, setting)
        packed[key] = module
    # A packed module outside the plan (a factor inside a LowRankLinear is part of its unit) would be
    # written as dense tensors and never rebuilt.
    stray = [n for n, m in model.named_modules() if isinstance(m, PackedModule) and _owner(f"{n}.", packed) is None]
    if stray:
        raise ExportError(f"the model holds {len(stray)} packed modules the plan leaves dense (e.g. {stray[0]!r})")
    return packed


def _check_setting(key: str, module: PackedModule, setting: LinearSetting) -> None:
    group = module.in_features if setting.group_size is None else setting.group_size
    if isinstance(module, QuantLinear):
        ok = setting.sparsity == 0 and setting.rank is None and module.group_size == group
    elif isinstance(module, SparseLinear):
        ok = module.pattern is setting.pattern and (setting.bits == 16 or module.group_size == group)
    else:
        ok = module.rank == setting.rank
    if not ok or module.bits != setting.bits:
        raise ExportError(f"unit {key!r}: the model holds {module!r}, not the plan's setting {setting.label()}")


def meta_profile(model: PreTrainedModel) -> ModelProfile:
    """The model's profile from its config alone (its packed modules are not ``nn.Linear`` any more)."""
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return profile_model(shell, name=str(getattr(config, "_name_or_path", "") or type(model).__name__))


def weight_bytes(profile: ModelProfile, plan: Plan) -> int:
    """The memory model's bytes of the weights alone: every linear unit under the plan plus everything else."""
    memory = plan_memory(profile, plan, Workload())
    return memory.linear_bytes + memory.other_bytes


def storage_dtype(model: PreTrainedModel) -> torch.dtype:
    """The 16-bit dtype dense tensors are written in: the source config's when 16-bit, else bfloat16."""
    name = str(getattr(model.config, "dtype", None) or "").removeprefix("torch.")
    return _STORAGE_DTYPES.get(name, torch.bfloat16)


def _owner(name: str, packed: Mapping[str, nn.Module]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in packed:
            return prefix
    return None


def dense_tensors(
    model: nn.Module, packed: Mapping[str, nn.Module], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """State-dict tensors outside the packed modules at ``dtype`` (floats only), tied aliases, lossy names.

    A tensor that shares storage with one already taken (tied embeddings) is an alias, not a copy.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    lossy: list[str] = []
    seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in model.state_dict().items():
        if _owner(name, packed) is not None:
            continue
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        stored = tensor.detach().to("cpu")
        if stored.is_floating_point() and stored.dtype != dtype:
            converted = stored.to(dtype)
            if not torch.equal(converted.to(stored.dtype), stored):
                lossy.append(name)
            stored = converted
        tensors[name] = stored.contiguous()
    return tensors, aliases, lossy


def copy_side_files(source_dir: Path | None, staging: Path) -> list[str]:
    """Copy the source's tokenizer and generation files (regular files, by name) into the export."""
    copied: list[str] = []
    if source_dir is None:
        return copied
    for name in _SIDE_FILES:
        path = source_dir / name
        if path.is_file():
            (staging / name).write_bytes(path.read_bytes())
            copied.append(name)
    return copied


def config_dict(model: PreTrainedModel, dtype: torch.dtype) -> dict[str, Any]:
    """The model's transformers config as written: at the storage dtype, no private or path keys."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    data = {k: v for k, v in config.to_diff_dict().items() if not k.startswith("_")}
    data["architectures"] = data.get("architectures") or [type(model).__name__]
    data["dtype"] = str(dtype).removeprefix("torch.")
    data["model_type"] = config.model_type
    return data


# -- native ------------------------------------------------------------------------------------------------------


def _compute_dtype(model: nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise ExportError(f"the model's dense parameters must share one dtype; got {sorted(map(str, dtypes))}")
    return str(dtypes.pop()).removeprefix("torch.")


def write_native(
    staging: Path, model: PreTrainedModel, plan: Plan, packed: Mapping[str, PackedModule]
) -> dict[str, Any]:
    """Write the native format's weights, config and plan into ``staging``; returns the record's fields."""
    dtype = storage_dtype(model)
    tensors, aliases, lossy = dense_tensors(model, packed, dtype)
    modules: dict[str, dict[str, str]] = {}
    for key, module in sorted(packed.items()):
        held, metadata = module_tensors(module)
        modules[key] = metadata
        tensors.update({f"{key}.{name}": t.detach().to("cpu").contiguous() for name, t in held.items()})
    header = {"format": NATIVE_FORMAT, "version": EXPORT_VERSION, "modules": modules, "aliases": aliases}
    save_file(tensors, str(staging / WEIGHTS_NAME), metadata={_HEADER_KEY: json.dumps(header, sort_keys=True)})
    (staging / CONFIG_NAME).write_bytes(dump_json(config_dict(model, dtype)))
    (staging / PLAN_NAME).write_text(plan.to_json() + "\n")
    return {
        "compute_dtype": _compute_dtype(model),
        "storage_dtype": str(dtype).removeprefix("torch."),
        "lossy_tensors": lossy,
        "n_packed_units": len(packed),
    }


def _read_record(root: Path, expected_format: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((root / RECORD_NAME).read_text())
    if record.get("format") != expected_format or record.get("version") != EXPORT_VERSION:
        raise ExportError(
            f"{str(root)!r} is a {record.get('format')!r} export version {record.get('version')!r}; "
            f"load_compressed reads {expected_format!r} version {EXPORT_VERSION}"
        )
    return record


def _read_weights(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]], dict[str, str]]:
    try:
        with safe_open(str(root / WEIGHTS_NAME), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise ExportError(f"{root / WEIGHTS_NAME} is not a readable safetensors file: {error}") from error
    header = json.loads(metadata.get(_HEADER_KEY, "{}"))
    if header.get("format") != NATIVE_FORMAT or header.get("version") != EXPORT_VERSION:
        raise ExportError(f"{root / WEIGHTS_NAME} is not {NATIVE_FORMAT} version {EXPORT_VERSION} weights")
    return tensors, header["modules"], header["aliases"]


def _swap_packed(model: nn.Module, tensors: dict[str, torch.Tensor], modules: Mapping[str, Mapping[str, str]]) -> None:
    """Replace each packed unit's ``nn.Linear`` by its module rebuilt from the file (and drop its tensors)."""
    for key, metadata in modules.items():
        prefix = f"{key}."
        own = {name[len(prefix) :]: tensors.pop(name) for name in [n for n in tensors if n.startswith(prefix)]}
        if not isinstance(model.get_submodule(key), nn.Linear):
            raise ExportError(f"unit {key!r} of the export is not a linear layer of the model its config builds")
        parent, _, child = key.rpartition(".")
        setattr(model.get_submodule(parent), child, module_from_tensors(own, metadata))


def _load_dense(model: nn.Module, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> None:
    full = dict(tensors)
    full.update({alias: tensors[source] for alias, source in aliases.items()})
    state = model.state_dict()
    packed = _PackedView(model)
    missing = sorted(name for name in state if name not in full and _owner(name, packed) is None)
    unexpected = sorted(set(full) - set(state))
    if missing or unexpected:
        raise ExportError(f"export weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in full.items():
            state[name].copy_(tensor)


class _PackedView(Mapping[str, nn.Module]):
    """The model's packed modules by name, for ``_owner``."""

    def __init__(self, model: nn.Module) -> None:
        self._modules = {name: m for name, m in model.named_modules() if isinstance(m, PackedModule)}

    def __getitem__(self, key: str) -> nn.Module:
        return self._modules[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def wire_plan_kv_(model: PreTrainedModel, plan: Plan) -> None:
    """Attach the plan (``model.budgetpress_plan``) and make ``generate`` use the plan's KV cache.

    When the plan compresses a KV cache the attention is wired for ``PlanKVCache`` and ``generate``
    creates ``PlanKVCache.from_plan(plan, ...)`` whenever the caller passes no cache of its own.
    """
    setattr(model, PLAN_ATTR, plan)
    if not any(isinstance(s, KVSetting) and not s.is_dense for s in plan.values()):
        return
    use_plan_kv_attention_(model)
    n_layers = int(model.config.get_text_config().num_hidden_layers)
    prepare: Callable[..., Any] = getattr(model, "_prepare_cache_for_generation")  # noqa: B009

    def prepare_with_plan_cache(generation_config: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = PlanKVCache.from_plan(plan, n_layers=n_layers)
        return prepare(generation_config, model_kwargs, *args, **kwargs)

    # An instance attribute shadows the class's method for this model only (called unbound, without self).
    setattr(model, "_prepare_cache_for_generation", prepare_with_plan_cache)  # noqa: B010


def load_compressed(
    directory: Path | str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> PreTrainedModel:
    """Load a native export: a transformers model running on budgetpress' packed modules.

    The directory is verified against its manifest first. ``dtype`` is the compute dtype of the
    dense parts and activations (default: the dtype the model was exported from, which is the one
    its plan was evaluated in); packed tensors keep their own dtypes. When the plan compresses the
    KV cache, ``generate`` uses ``PlanKVCache.from_plan`` by default. The plan is ``model.budgetpress_plan``.
    """
    root = Path(directory).resolve(strict=True)
    verify_export(root)
    record = _read_record(root, NATIVE_FORMAT)
    check_config(root)
    plan = Plan.from_json((root / PLAN_NAME).read_text())
    compute = dtype or _COMPUTE_DTYPES[record["compute_dtype"]]
    config = AutoConfig.from_pretrained(root, trust_remote_code=False, local_files_only=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=compute, trust_remote_code=False)
    model.tie_weights()  # skipped under no_init_weights; the file holds tied tensors once
    tensors, modules, aliases = _read_weights(root)
    expected = {key for key, s in plan.items() if isinstance(s, LinearSetting) and not s.is_dense}
    if set(modules) != expected:
        raise ExportError(f"export {str(root)!r}: its packed modules do not match its plan's compressed units")
    _swap_packed(model, tensors, modules)
    _load_dense(model, tensors, aliases)
    packed_units(model, plan)
    model.eval()
    model.requires_grad_(False)
    if device is not None:
        model.to(device)
    wire_plan_kv_(model, plan)
    return model


# -- one entry point for both formats ----------------------------------------------------------------------------


def export_plan(
    model: PreTrainedModel,
    plan: Plan,
    *,
    out: Path | str,
    export_format: ExportFormat | str = ExportFormat.NATIVE,
    source_dir: Path | None = None,
    provenance: Mapping[str, Any] | None = None,
    root: Path | None = None,
    overwrite: bool = False,
    densify_sparse: bool = False,
) -> ExportReport:
    """Write ``model`` — assembled with ``plan``'s packed modules — as a checkpoint directory at ``out``.

    ``source_dir`` (the checkpoint the model came from) gives the tokenizer files; ``provenance``
    (study, trial, metrics...) goes into ``budgetpress.json``. ``root`` confines ``out``. For
    compressed-tensors, ``densify_sparse`` stores sparse units as dense weights with zeros where
    pruned (the format has no sparse layout); without it such plans are refused.
    """
    chosen = ExportFormat(export_format)
    packed = packed_units(model, plan)
    profile = meta_profile(model)
    expected = weight_bytes(profile, plan)
    target = resolve_target(out, root=root)
    if chosen is ExportFormat.COMPRESSED_TENSORS:
        from budgetpress.evaluators._compressed_tensors import check_expressible

        check_expressible(plan, {k: m.in_features for k, m in packed.items()}, densify_sparse=densify_sparse)
    with staged_directory(target, export_format=chosen, plan_key=plan.key, overwrite=overwrite) as staging:
        if chosen is ExportFormat.NATIVE:
            fields = write_native(staging, model, plan, packed)
            label = NATIVE_FORMAT
        else:
            from budgetpress.evaluators._compressed_tensors import write_compressed_tensors

            fields = write_compressed_tensors(staging, model, plan, packed, densify_sparse=densify_sparse)
            label = ExportFormat.COMPRESSED_TENSORS.value
        copy_side_files(source_dir, staging)
        notes = _notes(fields)
        record = {
            "format": label,
            "version": EXPORT_VERSION,
            "plan_key": plan.key,
            "memory_model": {"weight_bytes": expected, "architecture": profile.architecture},
            "weights": {"file": WEIGHTS_NAME, "bytes": (staging / WEIGHTS_NAME).stat().st_size},
            "provenance": dict(provenance or {}),
            **fields,
        }
        (staging / RECORD_NAME).write_bytes(dump_json(record))
    return _report(target, chosen, plan, expected, notes)


def _notes(fields: Mapping[str, Any]) -> tuple[str, ...]:
    notes = [str(n) for n in fields.get("notes", ())]
    lossy = fields.get("lossy_tensors") or []
    if lossy:
        notes.append(
            f"{len(lossy)} dense tensors lost precision when stored at {fields.get('storage_dtype')} "
            f"(e.g. {lossy[0]}); reloaded logits differ from the in-memory model's"
        )
    for note in notes:
        logger.warning("export: %s", note)
    return tuple(notes)


def _report(target: Path, chosen: ExportFormat, plan: Plan, expected: int, notes: tuple[str, ...]) -> ExportReport:
    manifest = verify_export(target)
    files = tuple(
        ExportedFile(name=name, bytes=entry["bytes"], sha256=entry["sha256"])
        for name, entry in sorted(manifest["files"].items())
    )
    return ExportReport(
        directory=str(target),
        format=chosen,
        plan_key=plan.key,
        files=files,
        manifest_sha256=file_sha256(target / MANIFEST_NAME),
        weight_bytes_on_disk=(target / WEIGHTS_NAME).stat().st_size,
        memory_model_weight_bytes=expected,
        notes=notes,
    )
