"""Round-to-nearest group-wise asymmetric weight quantization, the calibration-free method."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes (one per weight, unpacked), and per (row, group) scales and zero points."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        n_groups = self.scales.shape[1]
        padded = n_groups * self.group_size
        codes = torch.zeros(out_features, padded, dtype=torch.float32)
        codes[:, :in_features] = self.codes.float()
        grouped = codes.view(out_features, n_groups, self.group_size)
        weight = (grouped - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
        return weight.reshape(out_features, padded)[:, :in_features]


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int | None) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] to ``bits`` with one scale and zero point per group of a row.

    ``group_size`` None means one group per row (per-channel). The zero point is an integer code,
    so the grid holds the row's min and max of each group exactly up to rounding.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"RTN bits must be between 2 and 8; got {bits}")
    out_features, in_features = weight.shape
    size = in_features if group_size is None else group_size
    n_groups = -(-in_features // size)
    padded = torch.zeros(out_features, n_groups * size, dtype=torch.float32)
    padded[:, :in_features] = weight.float()
    # Padding columns repeat the row's first value so they never widen a group's range.
    if n_groups * size > in_features:
        padded[:, in_features:] = weight[:, :1].float()
    grouped = padded.view(out_features, n_groups, size)
    low = grouped.amin(dim=-1).clamp(max=0.0)
    high = grouped.amax(dim=-1).clamp(min=0.0)
    max_code = 2**bits - 1
    scales = ((high - low) / max_code).clamp(min=1e-8).half().float()
    zeros = torch.round(-low / scales).clamp(0, max_code)
    codes = torch.round(grouped / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, max_code)
    return QuantizedWeight(
        codes=codes.reshape(out_features, -1)[:, :in_features].to(torch.uint8).contiguous(),
        scales=scales.half(),
        zeros=zeros.to(torch.uint8),
        group_size=size,
    )
