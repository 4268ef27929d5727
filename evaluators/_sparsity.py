"""Pruning a weight to the memory model's sparse layouts: magnitude, Wanda and SparseGPT.

Every method keeps exactly ``k = in - round(sparsity * in)`` weights in every row (unstructured)
or exactly 2 of every 4 consecutive columns (2:4), the layouts ``space/_memory.py`` counts.

* Magnitude prunes the smallest |W| of each row; Wanda the smallest |W_ij| * ||x_j||_2 of each
  row (its per-output comparison group). Neither changes the kept weights. With ``bits < 16``
  the kept weights are then quantized: GPTQ-style, compensating the quantization error on the
  later kept weights of the row through the Hessian, when the statistics hold one (the target
  being the pruned weight, so the pruning itself stays uncompensated, as the method defines);
  round-to-nearest otherwise.
* SparseGPT sweeps the columns with OBS updates (the GPTQ sweep of ``_gptq.py``), pruning and,
  with ``bits < 16``, quantizing jointly, every error pushed onto the later columns. Its mask
  saliency is w^2 / [chol(H^-1)]_jj^2 on the current (already compensated) weights. The paper
  selects, per block of 128 columns, the lowest-saliency fraction of the whole block (rows may
  differ); to keep exactly k per row this module instead gives each row a pruning budget and,
  at each block start, ranks the row's saliencies over all columns not yet swept: the budget's
  lowest are the row's provisional prunes, and those inside the block are committed. The last
  block commits the rest of the budget, so every row ends with exactly k kept, and a row may
  spend its budget unevenly across blocks as Wanda's per-row selection does. 2:4 masks are
  chosen every 4 columns on the current weights, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from budgetpress.evaluators._calibration import InputStats
from budgetpress.evaluators._gptq import check_bits, inverse_hessian_factor, make_grid, obs_sweep
from budgetpress.evaluators._rtn import QuantizedWeight, rtn_quantize
from budgetpress.space import SparsityPattern


@dataclass(frozen=True)
class PrunedWeight:
    """A pruned (and possibly quantized) weight in the form the sparse kernels pack.

    ``weight`` is zero where ``mask`` is False; when ``quantized`` is set, ``weight`` equals
    ``quantized.dequantize() * mask`` exactly, and codes of pruned entries are their group's
    zero point.
    """

    mask: torch.Tensor  # bool [out, in]
    weight: torch.Tensor  # float32 [out, in]
    quantized: QuantizedWeight | None


def kept_per_row(in_features: int, sparsity: float, pattern: SparsityPattern | str) -> int:
    """Weights each row keeps; the memory model's count (Python ``round``, as it uses)."""
    pattern = _check_pattern(in_features, sparsity, pattern)
    if pattern is SparsityPattern.SEMI_2_4:
        return in_features // 2
    return in_features - round(sparsity * in_features)


def _check_pattern(in_features: int, sparsity: float, pattern: SparsityPattern | str) -> SparsityPattern:
    pattern = SparsityPattern(pattern)
    if pattern is SparsityPattern.NONE:
        raise ValueError("pruning needs a pattern: 'unstructured' or '2:4'")
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1); got {sparsity!r}")
    if pattern is SparsityPattern.SEMI_2_4 and (sparsity != 0.5 or in_features % 4):
        raise ValueError(f"2:4 needs sparsity 0.5 and in_features divisible by 4; got {sparsity!r} and {in_features}")
    return pattern


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's rank in its row, ascending (ties by column: deterministic)."""
    order = torch.argsort(scores, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order).contiguous())
    return ranks


def select_mask(scores: torch.Tensor, *, sparsity: float, pattern: SparsityPattern | str) -> torch.Tensor:
    """Keep mask [out, in] holding the highest scores: exactly k per row, or 2 of every 4 columns."""
    in_features = int(scores.shape[1])
    pattern = _check_pattern(in_features, sparsity, pattern)
    if pattern is SparsityPattern.SEMI_2_4:
        return _keep_two_of_four(scores)
    pruned = in_features - kept_per_row(in_features, sparsity, pattern)
    return _ranks(scores) >= pruned


def _keep_two_of_four(scores: torch.Tensor) -> torch.Tensor:
    rows, cols = scores.shape
    return (_ranks(scores.reshape(rows, cols // 4, 4)) >= 2).reshape(rows, cols)


class _FixedPruner:
    """A mask chosen before the sweep (magnitude, Wanda): committed at the first column."""

    sees_all = False

    def __init__(self, mask: torch.Tensor) -> None:
        self.fixed = mask
        self.step = int(mask.shape[1])

    def propose(self, current: torch.Tensor, diag: torch.Tensor, start: int, width: int) -> torch.Tensor:
        return self.fixed[:, start : start + width]

    def commit(self, keep: torch.Tensor, start: int) -> None:
        pass


class _RowBudgetPruner:
    """SparseGPT's unstructured choice with exactly k kept per row (see the module docstring)."""

    sees_all = True

    def __init__(self, rows: int, pruned_per_row: int, block_size: int, device: torch.device) -> None:
        self.budget = torch.full((rows,), pruned_per_row, dtype=torch.long, device=device)
        self.step = block_size

    def propose(self, current: torch.Tensor, diag: torch.Tensor, start: int, width: int) -> torch.Tensor:
        saliency = current.pow(2) / diag.pow(2).unsqueeze(0)
        keep = _ranks(saliency) >= self.budget.unsqueeze(1)
        return keep[:, :width]

    def commit(self, keep: torch.Tensor, start: int) -> None:
        self.budget -= (~keep).sum(dim=1)


class _TwoOfFourPruner:
    """SparseGPT's 2:4 choice: every 4 columns, the 2 of highest saliency on the current weights."""

    sees_all = False
    step = 4

    def propose(self, current: torch.Tensor, diag: torch.Tensor, start: int, width: int) -> torch.Tensor:
        saliency = current[:, :width].pow(2) / diag[:width].pow(2).unsqueeze(0)
        return _keep_two_of_four(saliency)

    def commit(self, keep: torch.Tensor, start: int) -> None:
        pass


def _result(mask: torch.Tensor, weight: torch.Tensor, quantized: QuantizedWeight | None) -> PrunedWeight:
    if quantized is not None:
        # The kernels hold dequantize() * mask; deriving the float weight from it keeps them equal.
        weight = quantized.dequantize() * mask
    return PrunedWeight(mask=mask, weight=(weight * mask).float().contiguous(), quantized=quantized)


def _sweep(
    weight: torch.Tensor,
    stats: InputStats,
    pruner: _FixedPruner | _RowBudgetPruner | _TwoOfFourPruner,
    *,
    bits: int,
    group_size: int | None,
    damp: float,
    block_size: int,
    zero_dead: bool,
) -> PrunedWeight:
    """One OBS sweep of ``weight`` with ``pruner``'s masks, quantizing when ``bits < 16``.

    ``zero_dead`` sets the weights of inputs never active in calibration to 0 (SparseGPT then
    prunes them first); a fixed mask keeps them as they are.
    """
    w = weight.detach().float().clone()
    stats.check_for(w.shape[1])
    hinv, dead = inverse_hessian_factor(stats.hessian().to(w.device), damp=damp)
    if zero_dead:
        w[:, dead] = 0.0
    grid = None if bits == 16 else make_grid(w, bits, group_size, static=False)
    result = obs_sweep(w, hinv, grid=grid, pruner=pruner, block_size=block_size)
    quantized = None
    if grid is not None and result.codes is not None:
        quantized = QuantizedWeight(
            codes=result.codes.contiguous(),
            scales=grid.scales.half(),
            zeros=grid.zeros.to(torch.uint8),
            group_size=grid.group_size,
        )
    return _result(result.mask, result.weight, quantized)


def _prune_with_scores(
    weight: torch.Tensor,
    scores: torch.Tensor,
    stats: InputStats | None,
    *,
    sparsity: float,
    pattern: SparsityPattern | str,
    bits: int,
    group_size: int | None,
    damp: float,
    block_size: int,
) -> PrunedWeight:
    """Prune by a fixed score, then quantize the kept weights (GPTQ with a Hessian, else RTN)."""
    if bits != 16:
        check_bits(bits, group_size)
    mask = select_mask(scores, sparsity=sparsity, pattern=pattern)
    pruned = weight.detach().float() * mask
    if bits == 16:
        return _result(mask, pruned, None)
    if stats is None or stats.xtx is None:
        return _result(mask, pruned, rtn_quantize(pruned, bits=bits, group_size=group_size))
    swept = _sweep(
        pruned,
        stats,
        _FixedPruner(mask),
        bits=bits,
        group_size=group_size,
        damp=damp,
        block_size=block_size,
        zero_dead=False,
    )
    return _result(mask, swept.weight, swept.quantized)


def prune_magnitude(
    weight: torch.Tensor,
    *,
    sparsity: float,
    pattern: SparsityPattern | str,
    bits: int = 16,
    group_size: int | None = 128,
    stats: InputStats | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> PrunedWeight:
    """Keep the largest |W| of each row (or of each 4 columns for 2:4); quantize if ``bits < 16``.

    ``stats`` is only used to quantize the kept weights GPTQ-style; without it they are rounded.
    """
    return _prune_with_scores(
        weight,
        weight.detach().float().abs(),
        stats,
        sparsity=sparsity,
        pattern=pattern,
        bits=bits,
        group_size=group_size,
        damp=damp,
        block_size=block_size,
    )


def prune_wanda(
    weight: torch.Tensor,
    stats: InputStats,
    *,
    sparsity: float,
    pattern: SparsityPattern | str,
    bits: int = 16,
    group_size: int | None = 128,
    damp: float = 0.01,
    block_size: int = 128,
) -> PrunedWeight:
    """Wanda (Sun et al., 2023): keep the largest |W_ij| * ||x_j||_2 of each row (or 2 of 4).

    Statistics with column norms only suffice; a Hessian in them makes the quantization of the
    kept weights (``bits < 16``) GPTQ-style.
    """
    stats.check_for(weight.shape[1])
    scores = weight.detach().float().abs() * stats.column_norms().to(weight.device).unsqueeze(0)
    return _prune_with_scores(
        weight,
        scores,
        stats,
        sparsity=sparsity,
        pattern=pattern,
        bits=bits,
        group_size=group_size,
        damp=damp,
        block_size=block_size,
    )


def prune_sparsegpt(
    weight: torch.Tensor,
    stats: InputStats,
    *,
    sparsity: float,
    pattern: SparsityPattern | str,
    bits: int = 16,
    group_size: int | None = 128,
    damp: float = 0.01,
    block_size: int = 128,
) -> PrunedWeight:
    """SparseGPT (Frantar & Alistarh, 2023): prune, and quantize when ``bits < 16``, jointly with
    OBS error compensation; exactly k kept per row (see the module docstring) or 2:4.
    """
    if bits != 16:
        check_bits(bits, group_size)
    out_features, in_features = weight.shape
    pattern = _check_pattern(in_features, sparsity, pattern)
    pruner: _RowBudgetPruner | _TwoOfFourPruner
    if pattern is SparsityPattern.SEMI_2_4:
        pruner = _TwoOfFourPruner()
    else:
        pruned = in_features - kept_per_row(in_features, sparsity, pattern)
        pruner = _RowBudgetPruner(out_features, pruned, block_size, weight.device)
    return _sweep(
        weight,
        stats,
        pruner,
        bits=bits,
        group_size=group_size,
        damp=damp,
        block_size=block_size,
        zero_dead=True,
    )
