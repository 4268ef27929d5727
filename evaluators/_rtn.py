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
        codes = torch.zeros(out_features, padded, dtype=torch.float32, device=self.codes.device)
        codes[:, :in_features] = self.codes.float()
        grouped = codes.view(out_features, n_groups, self.group_size)
        weight = (grouped - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
        return weight.reshape(out_features, padded)[:, :in_features]


# The smallest positive fp16: an all-zero group (common once a weight is pruned) must keep a
# non-zero scale to divide by.
_FP16_TINY = 2.0**-24


def grid_params(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable, as float32) and integer zero point of each row of ``values`` [..., n].

    The grid always spans 0, so the zero point is an integer code and zeros are exact.
    """
    max_code = 2**bits - 1
    low = values.amin(dim=-1).clamp(max=0.0)
    high = values.amax(dim=-1).clamp(min=0.0)
    scales = ((high - low) / max_code).half().float().clamp(min=_FP16_TINY)
    zeros = torch.round(-low / scales).clamp(0, max_code)
    return scales, zeros


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
    # Zero padding never widens a group's range: every grid spans 0 anyway.
    padded = torch.zeros(out_features, n_groups * size, dtype=torch.float32, device=weight.device)
    padded[:, :in_features] = weight.detach().float()
    grouped = padded.view(out_features, n_groups, size)
    scales, zeros = grid_params(grouped, bits)
    codes = torch.round(grouped / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, 2**bits - 1)
    return QuantizedWeight(
        codes=codes.reshape(out_features, -1)[:, :in_features].to(torch.uint8).contiguous(),
        scales=scales.half(),
        zeros=zeros.to(torch.uint8),
        group_size=size,
    )
