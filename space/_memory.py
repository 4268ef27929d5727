"""Exact byte counts for a plan. These layouts are the contract for the kernels.

Everything is an exact integer; the packed kernels must store exactly this.

Linear weights, shape (out rows, in cols), ``linear_bytes(unit, setting)``:

* A bias (if ``has_bias``) is always 16-bit: ``2*out`` bytes, added once.
* Dense (bits 16, no sparsity, no rank): ``2*out*in``.
* ``_quantized_matrix_bytes(rows, cols, bits, group_size, kept_per_row)``:
  if bits == 16: ``2*rows*kept_per_row``. Otherwise packed codes, each row
  packed into 32-bit words: ``4*rows*ceil(kept_per_row*bits/32)``; plus an
  fp16 scale and a uint8 zero point for each (row, group), where groups
  partition the ORIGINAL cols: ``n_groups = ceil(cols/group_size)`` (1 if
  group_size is None, i.e. per-channel): ``rows*n_groups*(2+1)``.
* Quantized only: ``_quantized_matrix_bytes(out, in, bits, g, in)``.
* Unstructured sparsity s: ``pruned_per_row = round(s*in)`` (Python round),
  kept ``k = in - pruned_per_row``; a bitmask of ``out*ceil(in/8)`` bytes
  plus ``_quantized_matrix_bytes(out, in, bits, g, k)``.
* 2:4 sparsity: requires ``in % 4 == 0``; ``k = in//2``; 2-bit indices per
  kept value packed per row in 32-bit words: ``4*out*ceil(k*2/32)``; plus
  ``_quantized_matrix_bytes(out, in, bits, g, k)``.
* Low rank r: two factors, down (r rows x in cols) and up (out rows x r
  cols), each ``_quantized_matrix_bytes`` with the setting's bits and group
  size and all columns kept.

KV cache of one layer, ``kv_bytes(unit, setting, workload)``:

* Tokens held ``t = min(kept_tokens, context)`` if kept_tokens else
  ``context``.
* Per (batch row, kv head), at 16 bits: ``2 (K and V) * t * head_dim * 2``.
* Otherwise the KIVI layout with ``KV_GROUP = 32`` and ``KV_RESIDUAL = 32``:
  quantized tokens ``q = ((t - KV_RESIDUAL) // KV_GROUP) * KV_GROUP`` if
  ``t > KV_RESIDUAL`` else 0; full-precision tokens ``f = t - q``.
  Keys (quantized per channel in groups of KV_GROUP tokens):
  ``ceil(q*head_dim*bits/8) + (q//KV_GROUP)*head_dim*4`` (fp16 scale + fp16
  zero). Values (per token, one group per head per token):
  ``ceil(q*head_dim*bits/8) + q*4``. Plus full precision ``2*f*head_dim*2``.
* Multiplied by ``batch * n_kv_heads``.

Parameters outside every linear unit are counted at ``profile.other_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._plan import Plan
from ._profile import ModelProfile
from ._settings import KVSetting, LinearSetting, Setting, SparsityPattern
from ._units import KVUnit, LinearUnit, Unit
from ._workload import Workload

KV_GROUP = 32
KV_RESIDUAL = 32

_DENSE_LINEAR = LinearSetting()
_DENSE_KV = KVSetting()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _quantized_matrix_bytes(rows: int, cols: int, bits: int, group_size: int | None, kept_per_row: int) -> int:
    if bits == 16:
        return 2 * rows * kept_per_row
    codes = 4 * rows * _ceil_div(kept_per_row * bits, 32)
    n_groups = 1 if group_size is None else _ceil_div(cols, group_size)
    return codes + rows * n_groups * (2 + 1)


def _weight_bytes(unit: LinearUnit, setting: LinearSetting) -> int:
    rows, cols, bits, g = unit.out_features, unit.in_features, setting.bits, setting.group_size
    if setting.rank is not None:
        r = setting.rank
        down = _quantized_matrix_bytes(r, cols, bits, g, cols)
        return down + _quantized_matrix_bytes(rows, r, bits, g, r)
    if setting.pattern is SparsityPattern.UNSTRUCTURED:
        kept = cols - round(setting.sparsity * cols)
        mask = rows * _ceil_div(cols, 8)
        return mask + _quantized_matrix_bytes(rows, cols, bits, g, kept)
    if setting.pattern is SparsityPattern.SEMI_2_4:
        if cols % 4:
            raise ValueError(f"2:4 sparsity needs in_features divisible by 4; {unit.name} has in_features={cols}")
        kept = cols // 2
        indices = 4 * rows * _ceil_div(kept * 2, 32)
        return indices + _quantized_matrix_bytes(rows, cols, bits, g, kept)
    return _quantized_matrix_bytes(rows, cols, bits, g, cols)


def linear_bytes(unit: LinearUnit, setting: LinearSetting) -> int:
    """Bytes to store ``unit`` under ``setting`` (weights, metadata and bias)."""
    bias = 2 * unit.out_features if unit.has_bias else 0
    return _weight_bytes(unit, setting) + bias


def kv_bytes(unit: KVUnit, setting: KVSetting, workload: Workload) -> int:
    """Bytes of one layer's KV cache under ``setting`` at ``workload``."""
    context = workload.context
    tokens = min(setting.kept_tokens, context) if setting.kept_tokens else context
    return workload.batch * unit.n_kv_heads * _kv_head_bytes(tokens, unit.head_dim, setting.bits)


def _kv_head_bytes(tokens: int, head_dim: int, bits: int) -> int:
    if bits == 16:
        return 2 * tokens * head_dim * 2
    quantized = ((tokens - KV_RESIDUAL) // KV_GROUP) * KV_GROUP if tokens > KV_RESIDUAL else 0
    full = tokens - quantized
    codes = _ceil_div(quantized * head_dim * bits, 8)
    keys = codes + (quantized // KV_GROUP) * head_dim * 4
    values = codes + quantized * 4
    return keys + values + 2 * full * head_dim * 2


def effective_bits(unit: LinearUnit, setting: LinearSetting) -> float:
    """``linear_bytes * 8 / (in*out)``; includes metadata and any bias."""
    return linear_bytes(unit, setting) * 8 / (unit.in_features * unit.out_features)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBreakdown:
    """Bytes by category; ``per_unit`` lists every unit in profile order."""

    linear_bytes: int
    kv_bytes: int
    other_bytes: int
    per_unit: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return self.linear_bytes + self.kv_bytes + self.other_bytes


def plan_memory(profile: ModelProfile, plan: Plan, workload: Workload) -> MemoryBreakdown:
    """Memory of ``profile`` under ``plan``; units the plan omits are dense."""
    _check_plan_keys(profile, plan)
    per_unit: list[tuple[str, int]] = []
    linear_total = kv_total = 0
    for unit in profile.units():
        n_bytes = _unit_bytes(unit, plan.get(unit.key), workload)
        per_unit.append((unit.key, n_bytes))
        if isinstance(unit, LinearUnit):
            linear_total += n_bytes
        else:
            kv_total += n_bytes
    return MemoryBreakdown(
        linear_bytes=linear_total,
        kv_bytes=kv_total,
        other_bytes=profile.other_bytes,
        per_unit=tuple(per_unit),
    )


def plan_bytes(profile: ModelProfile, plan: Plan, workload: Workload) -> int:
    return plan_memory(profile, plan, workload).total


def dense_bytes(profile: ModelProfile, workload: Workload) -> int:
    """Bytes with every weight at 16 bits and a full 16-bit KV cache."""
    return plan_bytes(profile, Plan({}), workload)


def _check_plan_keys(profile: ModelProfile, plan: Plan) -> None:
    known = {unit.key for unit in profile.units()}
    unknown = [key for key in plan if key not in known]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5])
        raise ValueError(
            f"plan has {len(unknown)} unit key(s) not in profile {profile.name!r}: {shown}; "
            "accepted keys are the profile's linear module paths and 'kv.<layer>'"
        )


def _unit_bytes(unit: Unit, setting: Setting | None, workload: Workload) -> int:
    if isinstance(unit, LinearUnit):
        if setting is None:
            setting = _DENSE_LINEAR
        if not isinstance(setting, LinearSetting):
            raise ValueError(
                f"unit {unit.key!r} is a linear unit and needs a LinearSetting; got {type(setting).__name__}"
            )
        return linear_bytes(unit, setting)
    if setting is None:
        setting = _DENSE_KV
    if not isinstance(setting, KVSetting):
        raise ValueError(f"unit {unit.key!r} is a KV unit and needs a KVSetting; got {type(setting).__name__}")
    return kv_bytes(unit, setting, workload)
