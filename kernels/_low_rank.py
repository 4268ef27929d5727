"""A linear layer replaced by two low-rank factors, ``W ≈ up @ down``, and its ops.

``down`` is [rank, in] and ``up`` is [out, rank]. Both factors are stored the same way: dense bf16
tensors (setting bits 16) or ``QuantLinear`` modules without bias (packed codes, fp16 scales and
uint8 zero points per (row, group)); the layer may hold a bf16 bias. The held tensors are exactly
what ``space.linear_bytes`` counts for ``LinearSetting(bits=b, group_size=g, rank=r)``: each
factor as a quantized matrix with all its columns kept, the groups of ``up`` partitioning its
``rank`` columns.

Quantizing the factors is the caller's job (evaluators own the methods); ``from_factors`` takes the
quantizer as an argument, so this package never imports ``budgetpress.evaluators``.
"""

from __future__ import annotations

from typing import Protocol, TypeAlias

import torch
from torch import nn

from budgetpress.kernels._quant_linear import QuantLinear, quant_linear_reference

Factor: TypeAlias = QuantLinear | torch.Tensor


class QuantizedFactor(Protocol):
    """What a quantization method returns for one matrix (``evaluators.QuantizedWeight`` fits)."""

    @property
    def codes(self) -> torch.Tensor: ...

    @property
    def scales(self) -> torch.Tensor: ...

    @property
    def zeros(self) -> torch.Tensor: ...


class Quantizer(Protocol):
    """A weight quantizer such as ``evaluators.rtn_quantize``."""

    def __call__(self, weight: torch.Tensor, *, bits: int, group_size: int | None) -> QuantizedFactor: ...


def _factor_shape(factor: Factor) -> tuple[int, int]:
    """(rows, cols) of a factor, i.e. (out, in) of the map it applies."""
    if isinstance(factor, QuantLinear):
        return factor.out_features, factor.in_features
    if factor.ndim != 2:
        raise ValueError(f"a dense factor must be a 2-D tensor; got shape {list(factor.shape)}")
    return int(factor.shape[0]), int(factor.shape[1])


def _factor_bits(factor: Factor) -> int:
    return factor.bits if isinstance(factor, QuantLinear) else 16


def _factor_weight(factor: Factor) -> torch.Tensor:
    """The float32 matrix a factor stands for."""
    return factor.dequantized_weight() if isinstance(factor, QuantLinear) else factor.float()


def _check_factors(down: Factor, up: Factor, bias: torch.Tensor | None) -> None:
    rank, _ = _factor_shape(down)
    out_features, up_cols = _factor_shape(up)
    if up_cols != rank:
        raise ValueError(f"up must be [out, rank] with rank = down's {rank} rows; got {up_cols} columns")
    if _factor_bits(down) != _factor_bits(up):
        raise ValueError(
            f"both factors must be stored alike (one setting); got down at {_factor_bits(down)} bits "
            f"and up at {_factor_bits(up)} bits"
        )
    for name, factor in (("down", down), ("up", up)):
        if isinstance(factor, QuantLinear) and factor.bias is not None:
            raise ValueError(f"the {name} factor must have no bias; the layer holds the only bias")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}]; got {list(bias.shape)}")


def _apply_reference(factor: Factor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(factor, QuantLinear):
        return factor.run(quant_linear_reference, x, with_bias=False)
    return nn.functional.linear(x, factor.to(x.dtype))


def _apply_triton(factor: Factor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(factor, QuantLinear):
        from budgetpress.kernels._triton_quant import quant_linear_triton

        return factor.run(quant_linear_triton, x, with_bias=False)
    # A dense bf16 factor is an ordinary matmul: the vendor library already runs it well.
    return nn.functional.linear(x, factor.to(x.dtype))


def _apply_module(factor: Factor, x: torch.Tensor) -> torch.Tensor:
    # A QuantLinear's own forward picks Triton or the reference for x's device.
    return factor(x) if isinstance(factor, QuantLinear) else nn.functional.linear(x, factor.to(x.dtype))


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def low_rank_linear_reference(x: torch.Tensor, *, down: Factor, up: Factor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain-torch ``(x @ down.T) @ up.T + bias`` in ``x``'s dtype (the rank-r activation too)."""
    return _add_bias(_apply_reference(up, _apply_reference(down, x)), bias)


def low_rank_linear_triton(x: torch.Tensor, *, down: Factor, up: Factor, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton twin of ``low_rank_linear_reference``: quantized factors run ``quant_linear_triton``."""
    return _add_bias(_apply_triton(up, _apply_triton(down, x)), bias)


class LowRankLinear(nn.Module):
    """Replaces ``nn.Linear`` by ``up @ down``; holds only the two factors and an optional bias."""

    down: Factor
    up: Factor
    bias: torch.Tensor | None

    def __init__(self, *, down: Factor, up: Factor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        _check_factors(down, up, bias)
        self.rank, self.in_features = _factor_shape(down)
        self.out_features = _factor_shape(up)[0]
        self.bits = _factor_bits(down)
        for name, factor in (("down", down), ("up", up)):
            if isinstance(factor, QuantLinear):
                self.add_module(name, factor)
            else:
                self.register_buffer(name, factor.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16).contiguous())

    @classmethod
    def from_factors(
        cls,
        *,
        down: torch.Tensor,
        up: torch.Tensor,
        bias: torch.Tensor | None = None,
        bits: int,
        group_size: int | None,
        quantize: Quantizer | None = None,
    ) -> LowRankLinear:
        """Store float factors down [rank, in] and up [out, rank] at ``bits`` (16 keeps them bf16).

        Below 16 bits each factor goes through ``quantize`` (e.g. ``evaluators.rtn_quantize``) with
        the setting's group size, then is packed.
        """
        if bits == 16:
            return cls(down=down, up=up, bias=bias)
        if quantize is None:
            raise ValueError(f"{bits}-bit factors need a quantize function (e.g. evaluators.rtn_quantize)")

        def pack(weight: torch.Tensor) -> QuantLinear:
            q = quantize(weight, bits=bits, group_size=group_size)
            return QuantLinear.from_codes(q.codes, q.scales, q.zeros, bits=bits, group_size=group_size)

        return cls(down=pack(down), up=pack(up), bias=bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float32 weight [out, in]: ``up @ down`` of the stored (dequantized) factors."""
        return _factor_weight(self.up) @ _factor_weight(self.down)

    def held_bytes(self) -> int:
        """Bytes of every tensor this module holds (both factors and the bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(_apply_module(self.up, _apply_module(self.down, x)), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bits={self.bits}"
