"""Packed linear modules to and from flat tensors plus string metadata (a safetensors file's content).

``module_tensors`` gives exactly the tensors a ``QuantLinear``, ``SparseLinear`` or ``LowRankLinear``
holds (its buffers by their state-dict names, e.g. ``down.qweight`` for a quantized factor) and
the string metadata that rebuilds it; ``module_from_tensors`` is its exact inverse. The metadata:

* every module: ``format`` (``budgetpress.packed-linear``), ``version``, ``type`` (the class name),
  ``in_features``, ``out_features``, ``bits``;
* ``QuantLinear``: ``group_size`` (per-channel is stored as the row length, as the module does);
* ``SparseLinear``: ``group_size``, ``pattern`` (``unstructured`` or ``2:4``), ``kept_per_row``;
* ``LowRankLinear``: ``rank``, and below 16 bits ``down.group_size`` and ``up.group_size``.

Rebuilding is strict: unknown types, versions or keys, missing or extra tensors, and tensors whose
dtype the module would silently convert are all refused with a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from budgetpress.kernels._low_rank import LowRankLinear
from budgetpress.kernels._packing import PACKABLE_BITS, words_per_row
from budgetpress.kernels._quant_linear import QuantLinear
from budgetpress.kernels._sparse import SparseLinear, sparse_pattern
from budgetpress.space import SparsityPattern

FORMAT = "budgetpress.packed-linear"
FORMAT_VERSION = "1"
_COMMON_KEYS = frozenset({"format", "version", "type", "in_features", "out_features", "bits"})
_VALID_BITS = (2, 3, 4, 8, 16)
_QUANT_TENSORS = ("qweight", "scales", "zeros")


def module_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ``module`` holds (by buffer name, on its device) and the metadata that rebuilds it."""
    if isinstance(module, QuantLinear):
        metadata = _header(module, module.in_features, module.out_features, module.bits)
        metadata["group_size"] = str(module.group_size)
    elif isinstance(module, SparseLinear):
        metadata = _header(module, module.in_features, module.out_features, module.bits)
        metadata |= {
            "group_size": str(module.group_size),
            "pattern": module.pattern.value,
            "kept_per_row": str(module.kept_per_row),
        }
    elif isinstance(module, LowRankLinear):
        metadata = _header(module, module.in_features, module.out_features, module.bits)
        metadata["rank"] = str(module.rank)
        for name in ("down", "up"):
            factor = getattr(module, name)
            if isinstance(factor, QuantLinear):
                metadata[f"{name}.group_size"] = str(factor.group_size)
    else:
        raise ValueError(
            f"cannot serialize a {type(module).__name__}: only packed linears "
            f"({', '.join(_BUILDERS)}) have a tensor format"
        )
    tensors = {name: tensor.detach() for name, tensor in module.named_buffers()}
    return tensors, metadata


def module_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> nn.Module:
    """Rebuild the module ``module_tensors`` described, on ``tensors``' device (contiguous tensors are not copied)."""
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"metadata is not {FORMAT} version {FORMAT_VERSION}; got format {metadata.get('format')!r}, "
            f"version {metadata.get('version')!r}"
        )
    kind = metadata.get("type", "")
    entry = _BUILDERS.get(kind)
    if entry is None:
        raise ValueError(f"unknown packed module type {kind!r}; accepted: {', '.join(_BUILDERS)}")
    keys_for, tensors_for, build = entry
    _check_keys(kind, metadata, keys_for)
    _check_names(kind, tensors, tensors_for(metadata))
    module = build(tensors, metadata)
    _check_unconverted(module, tensors)
    # The metadata the rebuilt module gives must be the metadata it was built from (catches, e.g.,
    # low-rank factors whose shapes contradict the stated in/out features or rank).
    described = module_tensors(module)[1]
    if described != dict(metadata):
        wrong = sorted(k for k in described if described[k] != metadata.get(k))
        raise ValueError(f"{kind} tensors contradict the metadata at {wrong}")
    return module


def _header(module: nn.Module, in_features: int, out_features: int, bits: int) -> dict[str, str]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "type": type(module).__name__,
        "in_features": str(in_features),
        "out_features": str(out_features),
        "bits": str(bits),
    }


def _check_keys(kind: str, metadata: Mapping[str, str], keys_for: _KeysFor) -> None:
    missing = _COMMON_KEYS - set(metadata)
    if not missing:
        # The type's own keys may depend on the common ones (bits), so those are checked first.
        allowed = _COMMON_KEYS | keys_for(metadata)
        missing = allowed - set(metadata)
        unknown = set(metadata) - allowed
        if unknown:
            raise ValueError(f"{kind} metadata has unknown keys {sorted(unknown)}; accepted: {sorted(allowed)}")
    if missing:
        raise ValueError(f"{kind} metadata misses keys {sorted(missing)}")


def _int(metadata: Mapping[str, str], key: str, *, minimum: int = 1) -> int:
    text = metadata[key]
    if not text.isdecimal() or int(text) < minimum:
        raise ValueError(f"metadata {key!r} must be an integer >= {minimum}; got {text!r}")
    return int(text)


def _bits(metadata: Mapping[str, str]) -> int:
    bits = _int(metadata, "bits")
    if bits not in _VALID_BITS:
        raise ValueError(f"metadata 'bits' must be one of {_VALID_BITS}; got {bits}")
    return bits


def _pattern(metadata: Mapping[str, str]) -> SparsityPattern:
    return sparse_pattern(metadata.get("pattern", ""))


def _check_names(kind: str, tensors: Mapping[str, torch.Tensor], expected: frozenset[str]) -> None:
    names = set(tensors)
    missing = expected - names
    extra = names - expected - {"bias"}
    if missing or extra:
        raise ValueError(f"{kind} tensors: missing {sorted(missing)}, unexpected {sorted(extra)}")


def _check_unconverted(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors the constructor converted: a rebuilt module must hold exactly what was stored."""
    for name, held in module.named_buffers():
        given = tensors[name]
        if held.dtype != given.dtype or held.shape != given.shape:
            raise ValueError(
                f"tensor {name!r} is {given.dtype} {list(given.shape)}; "
                f"the {type(module).__name__} format holds {held.dtype} {list(held.shape)}"
            )


def _quant_keys(metadata: Mapping[str, str]) -> frozenset[str]:
    return frozenset({"group_size"})


def _quant_tensors(metadata: Mapping[str, str]) -> frozenset[str]:
    return frozenset(_QUANT_TENSORS)


def _build_quant(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> nn.Module:
    return _quant_linear(
        tensors,
        "",
        in_features=_int(metadata, "in_features"),
        out_features=_int(metadata, "out_features"),
        bits=_bits(metadata),
        group_size=_int(metadata, "group_size"),
        bias=tensors.get("bias"),
    )


def _quant_linear(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    *,
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> QuantLinear:
    """A QuantLinear from ``{prefix}qweight`` etc., its packed words checked (the constructor does not)."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"a quantized weight needs bits in {PACKABLE_BITS}; got {bits}")
    qweight = tensors[f"{prefix}qweight"]
    words = (out_features, words_per_row(in_features, bits))
    if tuple(qweight.shape) != words:
        raise ValueError(f"{prefix}qweight must be {list(words)}; got {list(qweight.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [{out_features}]; got {list(bias.shape)}")
    return QuantLinear(
        in_features=in_features,
        out_features=out_features,
        bits=bits,
        group_size=group_size,
        qweight=qweight,
        scales=tensors[f"{prefix}scales"],
        zeros=tensors[f"{prefix}zeros"],
        bias=bias,
    )


def _sparse_keys(metadata: Mapping[str, str]) -> frozenset[str]:
    return frozenset({"group_size", "pattern", "kept_per_row"})


def _sparse_tensors(metadata: Mapping[str, str]) -> frozenset[str]:
    meta = "mask" if _pattern(metadata) is SparsityPattern.UNSTRUCTURED else "indices"
    quantized = ("scales", "zeros") if _bits(metadata) != 16 else ()
    return frozenset({"values", meta, *quantized})


def _build_sparse(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> nn.Module:
    pattern = _pattern(metadata)
    return SparseLinear(
        in_features=_int(metadata, "in_features"),
        out_features=_int(metadata, "out_features"),
        pattern=pattern,
        bits=_bits(metadata),
        group_size=_int(metadata, "group_size"),
        kept_per_row=_int(metadata, "kept_per_row", minimum=0),
        values=tensors["values"],
        meta=tensors["mask" if pattern is SparsityPattern.UNSTRUCTURED else "indices"],
        scales=tensors.get("scales"),
        zeros=tensors.get("zeros"),
        bias=tensors.get("bias"),
    )


def _low_rank_keys(metadata: Mapping[str, str]) -> frozenset[str]:
    factor_groups = ("down.group_size", "up.group_size") if _bits(metadata) != 16 else ()
    return frozenset({"rank", *factor_groups})


def _low_rank_tensors(metadata: Mapping[str, str]) -> frozenset[str]:
    if _bits(metadata) == 16:
        return frozenset({"down", "up"})
    return frozenset(f"{factor}.{name}" for factor in ("down", "up") for name in _QUANT_TENSORS)


def _build_low_rank(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> nn.Module:
    rank, bits = _int(metadata, "rank"), _bits(metadata)
    if bits == 16:
        return LowRankLinear(down=tensors["down"], up=tensors["up"], bias=tensors.get("bias"))
    shapes = {"down": (_int(metadata, "in_features"), rank), "up": (rank, _int(metadata, "out_features"))}
    factors = {
        name: _quant_linear(
            tensors,
            f"{name}.",
            in_features=in_features,
            out_features=out_features,
            bits=bits,
            group_size=_int(metadata, f"{name}.group_size"),
        )
        for name, (in_features, out_features) in shapes.items()
    }
    return LowRankLinear(down=factors["down"], up=factors["up"], bias=tensors.get("bias"))


_KeysFor = Callable[[Mapping[str, str]], frozenset[str]]
_Builder = Callable[[Mapping[str, torch.Tensor], Mapping[str, str]], nn.Module]
_BUILDERS: dict[str, tuple[_KeysFor, _KeysFor, _Builder]] = {
    "QuantLinear": (_quant_keys, _quant_tensors, _build_quant),
    "SparseLinear": (_sparse_keys, _sparse_tensors, _build_sparse),
    "LowRankLinear": (_low_rank_keys, _low_rank_tensors, _build_low_rank),
}
