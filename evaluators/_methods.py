"""Which method makes each dimension's variants, and how a variant becomes a packed module.

A variant is what a compression method returns for one weight at one setting — a
``QuantizedWeight`` (bits), a ``PrunedWeight`` (sparsity, optionally quantized) or a
``LowRankWeight`` (rank, factors optionally quantized) — before packing. ``pack_variant`` turns
it into the kernels' module, which holds exactly the bytes ``space.linear_bytes`` counts, and
``variant_weight`` gives the float weight that module stands for (the fake-quantized weight).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

import torch
from torch import nn

from budgetpress.evaluators._calibration import InputStats
from budgetpress.evaluators._gptq import gptq_quantize
from budgetpress.evaluators._low_rank import LowRankWeight, svd_llm_low_rank, svd_low_rank
from budgetpress.evaluators._rtn import QuantizedWeight, rtn_quantize
from budgetpress.evaluators._sparsity import PrunedWeight, prune_magnitude, prune_sparsegpt, prune_wanda
from budgetpress.kernels import LowRankLinear, QuantLinear, SparseLinear
from budgetpress.space import LinearSetting

Variant: TypeAlias = QuantizedWeight | PrunedWeight | LowRankWeight


class BitsMethod(StrEnum):
    RTN = "rtn"
    GPTQ = "gptq"


class SparsityMethod(StrEnum):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"


class RankMethod(StrEnum):
    SVD = "svd"
    SVD_LLM = "svd-llm"


# What a search uses unless told otherwise: the calibration methods, which lose the least.
SEARCH_METHODS = "bits=gptq,sparsity=sparsegpt,rank=svd-llm"

_NEEDS_STATS = {BitsMethod.GPTQ, SparsityMethod.WANDA, SparsityMethod.SPARSEGPT, RankMethod.SVD_LLM}
_DIMENSIONS: dict[str, type[StrEnum]] = {"bits": BitsMethod, "sparsity": SparsityMethod, "rank": RankMethod}


@dataclass(frozen=True, slots=True, kw_only=True)
class Methods:
    """The method for each dimension; the defaults need no calibration data."""

    bits: BitsMethod = BitsMethod.RTN
    sparsity: SparsityMethod = SparsityMethod.MAGNITUDE
    rank: RankMethod = RankMethod.SVD

    @classmethod
    def parse(cls, text: str) -> Methods:
        """``"bits=gptq,sparsity=sparsegpt,rank=svd-llm"`` (any subset, any order)."""
        chosen: dict[str, StrEnum] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            dimension, _, name = part.partition("=")
            enum = _DIMENSIONS.get(dimension.strip())
            if enum is None or not name:
                raise ValueError(
                    f"method {part!r} must be DIMENSION=METHOD with DIMENSION one of {', '.join(_DIMENSIONS)}"
                )
            try:
                chosen[dimension.strip()] = enum(name.strip())
            except ValueError:
                accepted = ", ".join(m.value for m in enum)
                raise ValueError(f"unknown {dimension} method {name!r}; accepted: {accepted}") from None
        return cls(**chosen)  # type: ignore[arg-type]

    def to_text(self) -> str:
        return f"bits={self.bits.value},sparsity={self.sparsity.value},rank={self.rank.value}"

    def for_setting(self, setting: LinearSetting) -> StrEnum:
        """The method that makes ``setting``'s variant (rank, else sparsity, else bits)."""
        if setting.rank is not None:
            return self.rank
        if setting.sparsity:
            return self.sparsity
        return self.bits

    def needs_stats(self, setting: LinearSetting) -> bool:
        """Whether ``setting``'s variant reads calibration statistics under these methods.

        Beyond the methods that need them, magnitude pruning quantizes its kept weights GPTQ-style
        exactly when the bits method is GPTQ, so a variant never depends on whether statistics
        happened to be at hand.
        """
        if setting.is_dense:
            return False
        method = self.for_setting(setting)
        if method is SparsityMethod.MAGNITUDE:
            return setting.bits != 16 and self.bits is BitsMethod.GPTQ
        return method in _NEEDS_STATS


def compress_weight(
    weight: torch.Tensor, setting: LinearSetting, *, methods: Methods, stats: InputStats | None = None
) -> Variant:
    """Run the method ``methods`` names for ``setting`` on ``weight`` [out, in]."""
    if setting.is_dense:
        raise ValueError("a dense setting has no compressed variant; keep the nn.Linear")
    method = methods.for_setting(setting)
    if not methods.needs_stats(setting):
        stats = None
    elif stats is None:
        raise ValueError(f"method {method.value!r} needs calibration statistics of the unit's inputs")
    return _RUNNERS[method](weight.detach().float(), setting, stats)


def _bits(weight: torch.Tensor, setting: LinearSetting, stats: InputStats | None, *, gptq: bool) -> Variant:
    if gptq:
        assert stats is not None
        return gptq_quantize(weight, stats, bits=setting.bits, group_size=setting.group_size)
    return rtn_quantize(weight, bits=setting.bits, group_size=setting.group_size)


def _prune(
    weight: torch.Tensor, setting: LinearSetting, stats: InputStats | None, *, method: SparsityMethod
) -> Variant:
    options = {
        "sparsity": setting.sparsity,
        "pattern": setting.pattern,
        "bits": setting.bits,
        "group_size": setting.group_size,
    }
    if method is SparsityMethod.MAGNITUDE:
        return prune_magnitude(weight, stats=stats, **options)  # type: ignore[arg-type]
    assert stats is not None
    prune = prune_wanda if method is SparsityMethod.WANDA else prune_sparsegpt
    return prune(weight, stats, **options)  # type: ignore[arg-type]


def _factor(weight: torch.Tensor, setting: LinearSetting, stats: InputStats | None, *, aware: bool) -> Variant:
    assert setting.rank is not None
    if aware:
        assert stats is not None
        return svd_llm_low_rank(weight, stats, rank=setting.rank, bits=setting.bits, group_size=setting.group_size)
    return svd_low_rank(weight, rank=setting.rank, bits=setting.bits, group_size=setting.group_size)


_Runner = Callable[[torch.Tensor, LinearSetting, InputStats | None], Variant]
_RUNNERS: Mapping[StrEnum, _Runner] = {
    BitsMethod.RTN: lambda w, s, st: _bits(w, s, st, gptq=False),
    BitsMethod.GPTQ: lambda w, s, st: _bits(w, s, st, gptq=True),
    SparsityMethod.MAGNITUDE: lambda w, s, st: _prune(w, s, st, method=SparsityMethod.MAGNITUDE),
    SparsityMethod.WANDA: lambda w, s, st: _prune(w, s, st, method=SparsityMethod.WANDA),
    SparsityMethod.SPARSEGPT: lambda w, s, st: _prune(w, s, st, method=SparsityMethod.SPARSEGPT),
    RankMethod.SVD: lambda w, s, st: _factor(w, s, st, aware=False),
    RankMethod.SVD_LLM: lambda w, s, st: _factor(w, s, st, aware=True),
}


def _quant_linear(q: QuantizedWeight, *, bits: int, group_size: int | None) -> QuantLinear:
    return QuantLinear.from_codes(q.codes, q.scales, q.zeros, bits=bits, group_size=group_size)


def pack_variant(variant: Variant, setting: LinearSetting, *, bias: torch.Tensor | None) -> nn.Module:
    """The packed module that holds ``variant`` (and the layer's bias) in the kernels' format."""
    bits, group = setting.bits, setting.group_size
    if isinstance(variant, QuantizedWeight):
        return QuantLinear.from_codes(
            variant.codes, variant.scales, variant.zeros, bits=bits, group_size=group, bias=bias
        )
    if isinstance(variant, PrunedWeight):
        if variant.quantized is None:
            return SparseLinear.from_dense_values(variant.mask, variant.weight, pattern=setting.pattern, bias=bias)
        q = variant.quantized
        return SparseLinear.from_dense_codes(
            variant.mask, q.codes, q.scales, q.zeros, bits=bits, group_size=group, pattern=setting.pattern, bias=bias
        )
    if variant.down_q is None or variant.up_q is None:
        return LowRankLinear(down=variant.down, up=variant.up, bias=bias)
    return LowRankLinear(
        down=_quant_linear(variant.down_q, bits=bits, group_size=group),
        up=_quant_linear(variant.up_q, bits=bits, group_size=group),
        bias=bias,
    )


def variant_weight(variant: Variant) -> torch.Tensor:
    """The float32 weight [out, in] the packed module computes with (16-bit parts rounded to bf16)."""
    if isinstance(variant, QuantizedWeight):
        return variant.dequantize()
    if isinstance(variant, PrunedWeight):
        if variant.quantized is None:
            return variant.weight.bfloat16().float() * variant.mask
        return variant.quantized.dequantize() * variant.mask
    if variant.down_q is None or variant.up_q is None:
        return variant.up.bfloat16().float() @ variant.down.bfloat16().float()
    return variant.up_q.dequantize() @ variant.down_q.dequantize()
