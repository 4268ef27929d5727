"""The compressed-tensors export: a mixed-precision, asymmetric pack-quantized checkpoint.

Plain ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it (with compressed-tensors
installed), and it is the format vLLM reads. Each quantized unit is written as compressed-tensors
writes an asymmetric group (or channel) quantized linear:

* ``weight_packed`` int32 ``[out, ceil(in*bits/32)]``: the codes as signed ints ``code - 2**(bits-1)``,
  packed by compressed-tensors' own ``pack_to_int32`` (for 2, 4 and 8 bits the very words our
  ``QuantLinear`` holds);
* ``weight_scale`` ``[out, n_groups]``: our fp16 scales, unchanged;
* ``weight_zero_point`` int32: our zero points as ``zero - 2**(bits-1)``, packed along the rows;
* ``weight_shape`` int64 ``[2]``.

compressed-tensors dequantizes ``(q - zp) * scale``, which is ``(code - zero) * scale``: the same
weights our kernels compute with (loaded in float32, bit for bit). The config holds one group per
(bits, group size), its targets the exact module names.

What the format cannot express is refused with every unit and setting at fault: low-rank factors,
KV-cache settings (bits and eviction), 3-bit codes (compressed-tensors releases pack 3-bit values
in two different layouts, and vLLM serves only 4 and 8 bits), and group sizes that do not divide
a row. Sparse units have no sparse layout in the compressed-tensors releases transformers 5 loads;
with ``densify_sparse`` they are written as ordinary weights with exact zeros where pruned (a
quantized one as codes equal to its zero point), so the weights are the same but the file is not
smaller than dense-quantized.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from budgetpress.evaluators._export import (
    CONFIG_NAME,
    PLAN_NAME,
    WEIGHTS_NAME,
    PackedModule,
    config_dict,
    dense_tensors,
    storage_dtype,
)
from budgetpress.evaluators._export_dir import ExportError
from budgetpress.kernels import LowRankLinear, QuantLinear, SparseLinear, unpack_rows
from budgetpress.space import KVSetting, LinearSetting, Plan, Setting

logger = logging.getLogger(__name__)

PACK_FORMAT = "pack-quantized"
CT_BITS = (2, 4, 8)
VLLM_BITS = (4, 8)
# Projections vLLM fuses into one layer; fused shards must share one scheme.
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_SHOWN = 8


def _problem(setting: Setting, in_features: int, densify: bool) -> str | None:
    if isinstance(setting, KVSetting):
        return None if setting.is_dense else "KV-cache settings (bits, eviction) have no compressed-tensors form"
    if setting.is_dense:
        return None
    if setting.rank is not None:
        return "low-rank factors have no compressed-tensors form"
    if setting.sparsity and not densify:
        return (
            "sparsity has no compressed-tensors layout "
            "(densify_sparse / --densify-sparse stores it as dense weights with zeros where pruned)"
        )
    if setting.bits == 16:
        return None
    if setting.bits not in CT_BITS:
        return f"{setting.bits}-bit codes are not a portable pack-quantized layout (2, 4 and 8 bits are)"
    if setting.group_size is not None and in_features % setting.group_size:
        return f"group size {setting.group_size} does not divide the row of {in_features}"
    return None


def check_expressible(plan: Plan, in_features: Mapping[str, int], *, densify_sparse: bool) -> None:
    """Raise ``ExportError`` naming every unit (and its setting) that compressed-tensors cannot express.

    ``in_features`` gives each compressed linear unit's row length (a plan can be checked from the
    model's profile alone, before any weights are read).
    """
    faults: dict[str, list[str]] = {}
    for key, setting in plan.items():
        reason = _problem(setting, in_features.get(key, 0), densify_sparse)
        if reason is not None:
            faults.setdefault(reason, []).append(f"{key} ({setting.label()})")
    if not faults:
        return
    parts = []
    for reason, units in faults.items():
        shown = ", ".join(units[:_SHOWN]) + (f" and {len(units) - _SHOWN} more" if len(units) > _SHOWN else "")
        parts.append(f"{reason}: {shown}")
    raise ExportError(
        f"plan {plan.key[:12]} cannot be exported as compressed-tensors; {'; '.join(parts)}. "
        "Export it with --format native (every dimension)"
    )


def _signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    return (values.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _codes(module: QuantLinear | SparseLinear) -> torch.Tensor:
    """Unsigned codes ``[out, in]`` of a quantized module; a sparse one's pruned codes are its zero points.

    From the dequantized weight: ``(code - zero) * scale`` is exact in float32 (at most 8 + 11
    significant bits), so dividing by the scale and adding the zero point gives the code back exactly.
    """
    if isinstance(module, QuantLinear):
        return unpack_rows(module.qweight, module.bits, module.in_features)
    assert module.scales is not None and module.zeros is not None
    columns = torch.arange(module.in_features) // module.group_size
    scales, zeros = module.scales.float()[:, columns], module.zeros.float()[:, columns]
    weight = module.dequantized_weight()
    codes = torch.round(weight / scales + zeros)
    if not torch.equal((codes - zeros) * scales, weight) or codes.min() < 0 or codes.max() >= 2**module.bits:
        raise ExportError(f"sparse codes of a {module!r} do not round-trip through its scales")
    return codes.to(torch.uint8)


def _pack(codes: torch.Tensor, bits: int, *, packed_dim: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(_signed(codes, bits), bits, packed_dim=packed_dim).contiguous()


def _quantized_tensors(key: str, module: QuantLinear | SparseLinear) -> dict[str, torch.Tensor]:
    assert module.scales is not None and module.zeros is not None
    tensors = {
        f"{key}.weight_packed": _pack(_codes(module), module.bits, packed_dim=1),
        f"{key}.weight_scale": module.scales.detach().to("cpu").contiguous(),
        f"{key}.weight_zero_point": _pack(module.zeros, module.bits, packed_dim=0),
        f"{key}.weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64),
    }
    if module.bias is not None:
        tensors[f"{key}.bias"] = module.bias.detach().to("cpu").contiguous()
    return tensors


def _unit_tensors(key: str, module: PackedModule) -> dict[str, torch.Tensor]:
    if isinstance(module, LowRankLinear):
        raise ExportError(f"unit {key!r}: low-rank factors have no compressed-tensors form")
    if module.bits != 16:
        return _quantized_tensors(key, module)
    # A 16-bit sparse unit: its bf16 values, zeros where pruned, as an ordinary weight.
    tensors = {f"{key}.weight": module.dequantized_weight().to(torch.bfloat16).contiguous()}
    if module.bias is not None:
        tensors[f"{key}.bias"] = module.bias.detach().to("cpu").contiguous()
    return tensors


def _scheme_key(module: PackedModule) -> tuple[int, int | None]:
    assert isinstance(module, QuantLinear | SparseLinear)
    group = None if module.group_size == module.in_features else module.group_size
    return module.bits, group


def quantization_config(packed: Mapping[str, PackedModule]) -> Any:
    """compressed-tensors' ``QuantizationConfig``: one config group per (bits, group size)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    targets: dict[tuple[int, int | None], list[str]] = {}
    for key, module in sorted(packed.items()):
        if module.bits != 16:
            targets.setdefault(_scheme_key(module), []).append(key)
    groups = {}
    for index, ((bits, group), names) in enumerate(sorted(targets.items(), key=lambda item: str(item[0]))):
        weights = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=False,
            strategy="channel" if group is None else "group",
            group_size=group,
        )
        groups[f"group_{index}"] = QuantizationScheme(targets=names, weights=weights, format=PACK_FORMAT)
    return QuantizationConfig(
        config_groups=groups, format=PACK_FORMAT, quantization_status="compressed", ignore=["lm_head"]
    )


def vllm_notes(plan: Plan, unit_keys: Iterable[str]) -> list[str]:
    """Why vLLM might not serve this checkpoint (transformers loads it regardless)."""
    notes = []
    odd = sorted(k for k, s in plan.items() if isinstance(s, LinearSetting) and s.bits not in (*VLLM_BITS, 16))
    if odd:
        notes.append(f"vLLM serves 4- and 8-bit weights only; {len(odd)} units use other bits (e.g. {odd[0]})")
    shards: dict[tuple[str, tuple[str, ...]], dict[str, Setting]] = {}
    for key in unit_keys:
        parent, _, name = key.rpartition(".")
        for fused in _FUSED:
            if name in fused:
                shards.setdefault((parent, fused), {})[name] = plan.get(key, LinearSetting())
    mixed = [(parent, settings) for (parent, _), settings in sorted(shards.items()) if len(set(settings.values())) > 1]
    if mixed:
        parent, settings = mixed[0]
        example = ", ".join(f"{name} {setting.label()}" for name, setting in settings.items())
        notes.append(
            f"vLLM fuses q/k/v and gate/up projections and needs one scheme per fused layer; {len(mixed)} "
            f"fused layers mix settings (e.g. {parent}: {example})"
        )
    return notes


def write_compressed_tensors(
    staging: Path,
    model: PreTrainedModel,
    plan: Plan,
    packed: Mapping[str, PackedModule],
    *,
    densify_sparse: bool,
) -> dict[str, Any]:
    """Write the checkpoint (weights, config with its quantization_config, plan) into ``staging``."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    check_expressible(plan, {k: m.in_features for k, m in packed.items()}, densify_sparse=densify_sparse)
    dtype = storage_dtype(model)
    tensors, aliases, lossy = dense_tensors(model, packed, dtype)
    if aliases:
        tied = getattr(model.config, "tie_word_embeddings", False)
        if not tied:
            raise ExportError(f"tensors {sorted(aliases)} share storage but the config does not tie them")
    for key, module in sorted(packed.items()):
        tensors.update(_unit_tensors(key, module))
    save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
    (staging / CONFIG_NAME).write_text(json.dumps(config_dict(model, dtype), indent=2, sort_keys=True) + "\n")
    ModelCompressor(quantization_config=quantization_config(packed)).update_config(str(staging))
    (staging / PLAN_NAME).write_text(plan.to_json() + "\n")
    densified = sorted(k for k, m in packed.items() if isinstance(m, SparseLinear))
    notes = vllm_notes(plan, [name for name, m in model.named_modules() if isinstance(m, nn.Linear | PackedModule)])
    if densified:
        notes.append(f"{len(densified)} sparse units are stored dense (zeros where pruned), e.g. {densified[0]}")
    return {
        "compressed_tensors_version": ct_version,
        "storage_dtype": str(dtype).removeprefix("torch."),
        "lossy_tensors": lossy,
        "densified_sparse_units": densified,
        "notes": notes,
    }
