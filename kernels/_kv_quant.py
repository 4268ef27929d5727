"""KIVI-style quantization of one layer's keys and values, in the layout ``space/_memory.py`` counts.

For ``q`` quantized tokens (a multiple of ``KV_GROUP`` = 32) of ``head_dim`` D, per (batch row, kv head):

* Codes, keys and values alike: uint8 ``[q/32, 4*bits, D]``. Byte ``(g, j, d)`` holds channel ``d`` of the
  tokens ``g*32 + j*(8//bits) + i`` (``i < 8//bits``) at bits ``[i*bits, (i+1)*bits)``, least significant
  first. A group's 32 codes of one channel fill exactly ``4*bits`` bytes, so nothing is padded for any
  head_dim: ``q*D*bits/8`` bytes each for K and V. Packing along tokens (not channels) keeps every group a
  contiguous block (whole groups are evicted or gathered as one slice) and lets the decode kernel load a
  ``[32, D]`` tile with D contiguous.
* Keys, quantized per channel within each group of 32 tokens: an fp16 scale and an fp16 zero ``[q/32, D]``,
  ``(q/32)*D*4`` bytes.
* Values, quantized per token (one group of D channels): an fp16 scale and an fp16 zero ``[q]``, ``q*4``
  bytes.

Dequantization is ``code * scale + zero`` with the zero the group minimum (KIVI's asymmetric min-max).
Codes are rounded against the fp16-rounded scale and zero, so what is stored is what dequantizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from budgetpress.space import KV_GROUP

KV_QUANT_BITS = (2, 4, 8)
_FP16_MAX = 65504.0


def _check_bits(bits: int) -> None:
    if bits not in KV_QUANT_BITS:
        raise ValueError(f"KV cache codes take 2, 4 or 8 bits; got {bits}")


def _check_tokens(n_tokens: int) -> None:
    if n_tokens % KV_GROUP:
        raise ValueError(f"quantized KV tokens come in groups of {KV_GROUP}; got {n_tokens} tokens")


def pack_kv_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[..., n, D]`` (n a multiple of 32, each code < 2**bits) into uint8 ``[..., n/32, 4*bits, D]``."""
    _check_bits(bits)
    *lead, n_tokens, head_dim = codes.shape
    _check_tokens(n_tokens)
    per_byte = 8 // bits
    grouped = codes.to(torch.int32).reshape(*lead, n_tokens // KV_GROUP, 4 * bits, per_byte, head_dim)
    shifts = (torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits).view(per_byte, 1)
    return (grouped << shifts).sum(dim=-2).to(torch.uint8)


def unpack_kv_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_kv_codes`: uint8 ``[..., G, 4*bits, D]`` → uint8 codes ``[..., G*32, D]``."""
    _check_bits(bits)
    *lead, n_groups, n_rows, head_dim = packed.shape
    if n_rows != 4 * bits:
        raise ValueError(f"{bits}-bit KV codes pack a group into {4 * bits} byte rows; got {n_rows}")
    per_byte = 8 // bits
    shifts = (torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits).view(per_byte, 1)
    codes = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(*lead, n_groups * KV_GROUP, head_dim)


def _min_max_quantize(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, fp16 scale and fp16 zero of ``x`` reduced over ``dim`` (scale and zero keep that dim)."""
    x = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).to(torch.float16)
    # A constant group (or one whose range underflows fp16) needs no steps: any scale reproduces its zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = low.to(torch.float16)
    codes = torch.round((x - zero.float()) / scale.float()).clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, zero


def quantize_keys(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``[..., n, D]`` → packed codes ``[..., n/32, 4*bits, D]``, fp16 scale and zero ``[..., n/32, D]``."""
    _check_bits(bits)
    *lead, n_tokens, head_dim = keys.shape
    _check_tokens(n_tokens)
    grouped = keys.reshape(*lead, n_tokens // KV_GROUP, KV_GROUP, head_dim)
    codes, scale, zero = _min_max_quantize(grouped, dim=-2, bits=bits)
    packed = pack_kv_codes(codes.reshape(*lead, n_tokens, head_dim), bits)
    return packed, scale.squeeze(-2), zero.squeeze(-2)


def quantize_values(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values ``[..., n, D]`` → packed codes ``[..., n/32, 4*bits, D]``, fp16 scale and zero ``[..., n]``."""
    _check_bits(bits)
    _check_tokens(values.shape[-2])
    codes, scale, zero = _min_max_quantize(values, dim=-1, bits=bits)
    return pack_kv_codes(codes, bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_keys(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Keys ``[..., G*32, D]`` that packed codes and their per-(group, channel) scale and zero stand for."""
    codes = unpack_kv_codes(packed, bits).float()
    *lead, n_tokens, head_dim = codes.shape
    grouped = codes.view(*lead, n_tokens // KV_GROUP, KV_GROUP, head_dim)
    keys = grouped * scale.float().unsqueeze(-2) + zero.float().unsqueeze(-2)
    return keys.view(*lead, n_tokens, head_dim).to(dtype)


def dequantize_values(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values ``[..., n, D]`` that packed codes and their per-token scale and zero stand for."""
    codes = unpack_kv_codes(packed, bits).float()
    return (codes * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).to(dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizedKV:
    """The quantized part of one layer's cache: ``[batch, kv_heads, ...]`` tensors in the layout above."""

    bits: int
    key_codes: torch.Tensor  # uint8 [B, H, G, 4*bits, D]
    key_scale: torch.Tensor  # fp16 [B, H, G, D]
    key_zero: torch.Tensor  # fp16 [B, H, G, D]
    value_codes: torch.Tensor  # uint8 [B, H, G, 4*bits, D]
    value_scale: torch.Tensor  # fp16 [B, H, G*32]
    value_zero: torch.Tensor  # fp16 [B, H, G*32]

    @classmethod
    def quantize(cls, keys: torch.Tensor, values: torch.Tensor, bits: int) -> QuantizedKV:
        """Quantize keys and values ``[B, H, n, D]`` (n a multiple of 32)."""
        key_codes, key_scale, key_zero = quantize_keys(keys, bits)
        value_codes, value_scale, value_zero = quantize_values(values, bits)
        return cls(
            bits=bits,
            key_codes=key_codes,
            key_scale=key_scale,
            key_zero=key_zero,
            value_codes=value_codes,
            value_scale=value_scale,
            value_zero=value_zero,
        )

    @property
    def n_groups(self) -> int:
        return int(self.key_codes.shape[2])

    @property
    def n_tokens(self) -> int:
        return self.n_groups * KV_GROUP

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale, self.value_zero)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, n, D]`` in ``dtype``."""
        keys = dequantize_keys(self.key_codes, self.key_scale, self.key_zero, self.bits, dtype)
        values = dequantize_values(self.value_codes, self.value_scale, self.value_zero, self.bits, dtype)
        return keys, values

    def cat(self, other: QuantizedKV) -> QuantizedKV:
        """This part's groups followed by ``other``'s."""
        pairs = zip(self.tensors(), other.tensors(), strict=True)
        return QuantizedKV._from_tensors(self.bits, [torch.cat([a, b], dim=2) for a, b in pairs])

    def keep_groups(self, groups: torch.Tensor) -> QuantizedKV:
        """Only the groups ``groups`` (int64 ``[B, H, G']``, per batch row and head) in that order."""
        tokens = (groups.unsqueeze(-1) * KV_GROUP + torch.arange(KV_GROUP, device=groups.device)).flatten(2)
        out = []
        for tensor in self.tensors():
            per_token = tensor.shape[2] != self.n_groups
            index = tokens if per_token else groups
            index = index.view(*index.shape, *([1] * (tensor.ndim - 3))).expand(*index.shape, *tensor.shape[3:])
            out.append(torch.gather(tensor, 2, index))
        return QuantizedKV._from_tensors(self.bits, out)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedKV:
        """Apply ``fn`` to every tensor (batch reordering, moving devices)."""
        return QuantizedKV._from_tensors(self.bits, [fn(t) for t in self.tensors()])

    @staticmethod
    def _from_tensors(bits: int, tensors: list[torch.Tensor]) -> QuantizedKV:
        key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = tensors
        return QuantizedKV(
            bits=bits,
            key_codes=key_codes,
            key_scale=key_scale,
            key_zero=key_zero,
            value_codes=value_codes,
            value_scale=value_scale,
            value_zero=value_zero,
        )
