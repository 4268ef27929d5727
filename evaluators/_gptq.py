"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's error
onto the columns not yet quantized through the inverse input Hessian.

The sweep here is shared with SparseGPT (``_sparsity.py``): a column may also be pruned (set to
zero) before it is quantized, and the error of both is compensated the same way.

Quantization grids are those of ``rtn_quantize``: per (row, group) an fp16 scale and an integer
zero point, asymmetric, the range always holding 0, so a pruned weight (0) is exactly its group's
zero point. A group's grid is fixed when the sweep reaches the group's first column, from the
group's current (compensated, pruned) values; with act-order the grids are "static": all computed
up front from the original weight, so every group stays on its original columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from budgetpress.evaluators._calibration import InputStats
from budgetpress.evaluators._rtn import QuantizedWeight, grid_params

logger = logging.getLogger(__name__)

QUANT_BITS = (2, 3, 4, 8)


def quantize_column(
    column: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column on the given per-row grids."""
    codes = torch.round(column / scales + zeros).clamp(0, 2**bits - 1)
    return codes, (codes - zeros) * scales


def check_bits(bits: int, group_size: int | None) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"quantization bits must be one of {QUANT_BITS}; got {bits}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be positive or None (per-channel); got {group_size}")


def inverse_hessian_factor(
    hessian: torch.Tensor, *, damp: float = 0.01, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped H^-1 (float32), and the mask of dead inputs.

    Dead inputs (zero diagonal: never active in calibration) get H_jj = 1 so H stays invertible;
    callers zero their weights, which cannot change the calibration output. The damping is
    ``damp`` times the mean diagonal, raised tenfold while the factorization fails.
    """
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    if order is not None:
        h = h[order][:, order]
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(h + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    logger.warning("Hessian needed damping %.3g to factorize", damp * 10**attempt)
                return upper.float(), dead
    raise ValueError("the Hessian could not be factorized even with heavy damping; are the statistics finite?")


class Pruner(Protocol):
    """Chooses which weights a sweep keeps; see ``_sparsity.py``.

    ``step``: the sweep asks for a decision at every column index divisible by it and commits
    that many columns. ``propose`` gives keep masks [rows, width] for columns start..start+width
    from the current values of columns start.. (all remaining ones if ``sees_all``, else just
    the ``width`` asked about) and the inverse-Hessian factor's diagonal for the same columns;
    ``commit`` records a decision.
    """

    step: int
    sees_all: bool

    def propose(self, current: torch.Tensor, diag: torch.Tensor, start: int, width: int) -> torch.Tensor: ...

    def commit(self, keep: torch.Tensor, start: int) -> None: ...


@dataclass
class Grid:
    """Per (row, group) grids of one sweep; ``col_group[c]`` is the group of sweep column c."""

    bits: int
    group_size: int  # in_features when per-channel
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # float32 [out, n_groups]
    col_group: torch.Tensor  # int64 [in]
    static: bool


def make_grid(weight: torch.Tensor, bits: int, group_size: int | None, *, static: bool) -> Grid:
    """A grid for ``weight`` [out, in] in its original column order; static ones are filled now."""
    out_features, in_features = weight.shape
    size = in_features if group_size is None else group_size
    n_groups = -(-in_features // size)
    scales = torch.zeros(out_features, n_groups, device=weight.device)
    zeros = torch.zeros(out_features, n_groups, device=weight.device)
    if static:
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = grid_params(weight[:, g * size : (g + 1) * size], bits)
    col_group = torch.arange(in_features, device=weight.device) // size
    return Grid(bits=bits, group_size=size, scales=scales, zeros=zeros, col_group=col_group, static=static)


@dataclass
class SweepResult:
    weight: torch.Tensor  # float32 [out, in]: the compressed weight (dequantized, zeros where pruned)
    codes: torch.Tensor | None  # uint8 [out, in] when quantized
    mask: torch.Tensor  # bool [out, in]


class _Sweep:
    """State of one OBS sweep over the columns of W in the order given (lazy block updates).

    Columns of the current block live in ``block`` (updated column by column); later columns in
    ``w`` receive the block's errors in one product when the block is done.
    """

    def __init__(self, weight: torch.Tensor, hinv: torch.Tensor, grid: Grid | None, pruner: Pruner | None) -> None:
        self.w = weight.float().clone()
        self.hinv = hinv
        self.grid = grid
        self.pruner = pruner
        self.n_cols = weight.shape[1]
        self.mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        self.codes = torch.zeros(weight.shape, device=weight.device) if grid is not None else None
        self.decided = 0  # columns < decided have a committed mask
        self.block = self.w[:, :0]
        self.errors = self.w[:, :0]  # scaled errors of the block's columns swept so far (0 after)
        self.i1 = self.i2 = 0

    def run(self, block_size: int) -> SweepResult:
        for i1 in range(0, self.n_cols, block_size):
            self.i1, self.i2 = i1, min(i1 + block_size, self.n_cols)
            self.block = self.w[:, self.i1 : self.i2].clone()
            self.errors = torch.zeros_like(self.block)
            for i in range(self.i1, self.i2):
                self._prepare_column(i)
                self.errors[:, i - i1] = self._column(i)
            self.w[:, self.i1 : self.i2] = self.block
            # The lazy update: later blocks receive this block's errors in one matrix product.
            self.w[:, self.i2 :] -= self.errors @ self.hinv[self.i1 : self.i2, self.i2 :]
        codes = None if self.codes is None else self.codes.to(torch.uint8)
        return SweepResult(weight=self.w, codes=codes, mask=self.mask)

    def _current(self, start: int, width: int | None = None) -> torch.Tensor:
        """Current values of ``width`` columns (all remaining if None) from column ``start`` >= i1."""
        stop = self.n_cols if width is None else min(start + width, self.n_cols)
        in_block = self.block[:, start - self.i1 : stop - self.i1]
        beyond_start = max(start, self.i2)
        beyond = self.w[:, beyond_start:stop]
        if beyond.shape[1] and bool(self.errors.any()):
            # Columns past the block have not received this block's errors yet: add them here, so
            # the result does not depend on the block size.
            beyond = beyond - self.errors @ self.hinv[self.i1 : self.i2, beyond_start:stop]
        return torch.cat([in_block, beyond], dim=1)

    def _propose(self, start: int, width: int) -> torch.Tensor:
        """The pruner's keep proposal for columns start..start+width from the current values."""
        assert self.pruner is not None
        current = self._current(start, None if self.pruner.sees_all else width)
        diag = torch.diagonal(self.hinv)[start : start + current.shape[1]]
        return self.pruner.propose(current, diag, start, width)

    def _prepare_column(self, i: int) -> None:
        """Commit the pruning decision and fix the group grid that start at column ``i``."""
        pruner = self.pruner
        if pruner is not None and i % pruner.step == 0:
            width = min(pruner.step, self.n_cols - i)
            keep = self._propose(i, width)
            self.mask[:, i : i + width] = keep
            pruner.commit(keep, i)
            self.decided = i + width
        grid = self.grid
        if grid is not None and not grid.static and i % grid.group_size == 0:
            width = min(grid.group_size, self.n_cols - i)
            values = self._current(i, width) * self._group_mask(i, width)
            g = int(grid.col_group[i])
            grid.scales[:, g], grid.zeros[:, g] = grid_params(values, grid.bits)

    def _group_mask(self, i: int, width: int) -> torch.Tensor:
        """Keep mask of columns i..i+width: committed where decided, else the pruner's proposal now."""
        if self.pruner is None or self.decided >= i + width:
            return self.mask[:, i : i + width]
        start = max(self.decided, i)
        proposal = self._propose(start, i + width - start)
        return torch.cat([self.mask[:, i:start], proposal], dim=1)

    def _column(self, i: int) -> torch.Tensor:
        """Prune and quantize column i, update the block's later columns; returns its scaled error."""
        j = i - self.i1
        column = self.block[:, j].clone()
        target = column * self.mask[:, i]
        grid = self.grid
        if grid is not None and self.codes is not None:
            g = int(grid.col_group[i])
            codes, target = quantize_column(target, grid.scales[:, g], grid.zeros[:, g], grid.bits)
            self.codes[:, i] = codes
        error = (column - target) / self.hinv[i, i]
        self.block[:, j:] -= error.unsqueeze(1) * self.hinv[i, i : self.i2].unsqueeze(0)
        self.block[:, j] = target
        return error


def obs_sweep(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    *,
    grid: Grid | None,
    pruner: Pruner | None,
    block_size: int = 128,
) -> SweepResult:
    """Prune (``pruner``) and/or quantize (``grid``) ``weight`` [out, in] column by column with OBS
    error compensation, ``hinv`` being the upper Cholesky factor of H^-1 in the same column order.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive; got {block_size}")
    return _Sweep(weight, hinv, grid, pruner).run(block_size)


def gptq_quantize(
    weight: torch.Tensor,
    stats: InputStats,
    *,
    bits: int,
    group_size: int | None,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [out, in] with the input statistics of its calibration activations.

    ``act_order`` sweeps the columns by descending Hessian diagonal (most active inputs first);
    its groups are static (computed from the original weight) so they stay on original columns.
    Inputs never active in calibration are quantized as 0. Deterministic.
    """
    check_bits(bits, group_size)
    w = weight.detach().float().clone()
    stats.check_for(w.shape[1])
    hessian = stats.hessian().to(w.device)
    diag = torch.diagonal(hessian)
    order = torch.argsort(diag, descending=True, stable=True) if act_order else None
    hinv, dead = inverse_hessian_factor(hessian, damp=damp, order=order)
    w[:, dead] = 0.0
    grid = make_grid(w, bits, group_size, static=act_order)
    if order is not None:
        grid.col_group = grid.col_group[order]
        w = w[:, order]
    result = obs_sweep(w, hinv, grid=grid, pruner=None, block_size=block_size)
    assert result.codes is not None
    codes = result.codes
    if order is not None:
        codes = torch.empty_like(codes)
        codes[:, order] = result.codes
    return QuantizedWeight(
        codes=codes.contiguous(),
        scales=grid.scales.half(),
        zeros=grid.zeros.to(torch.uint8),
        group_size=grid.group_size,
    )
