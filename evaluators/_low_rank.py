"""Low-rank factorization of a weight: truncated SVD, and activation-aware SVD as SVD-LLM does it.

A weight W [out, in] becomes up [out, r] @ down [r, in]. The singular values are split evenly
(sqrt on each side) so the two factors have similar ranges, which suits quantizing both.

SVD-LLM (Wang et al., 2024) minimizes the output error ||X W^T - X W'^T|| instead of ||W - W'||:
with the Cholesky factor S of the input covariance X^T X = S S^T, that error is
||(W - W') S||_F, whose best rank-r W' is the truncated SVD of W S mapped back by S^-1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from budgetpress.evaluators._calibration import InputStats
from budgetpress.evaluators._gptq import check_bits
from budgetpress.evaluators._rtn import QuantizedWeight, rtn_quantize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowRankWeight:
    """Factors of a rank-r weight; ``*_q`` are set when the factors are quantized (bits < 16)."""

    down: torch.Tensor  # float32 [r, in]
    up: torch.Tensor  # float32 [out, r]
    down_q: QuantizedWeight | None
    up_q: QuantizedWeight | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) as the kernels will hold them: dequantized when quantized."""
        down = self.down if self.down_q is None else self.down_q.dequantize()
        up = self.up if self.up_q is None else self.up_q.dequantize()
        return down, up

    def effective(self) -> torch.Tensor:
        """The [out, in] weight the two factors compute, up @ down."""
        down, up = self.factors()
        return up @ down


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(
            f"rank must be between 1 and {min(weight.shape)} for a {tuple(weight.shape)} weight; got {rank}"
        )


def _finish(down: torch.Tensor, up: torch.Tensor, bits: int, group_size: int | None) -> LowRankWeight:
    down, up = down.float().contiguous(), up.float().contiguous()
    if bits == 16:
        return LowRankWeight(down=down, up=up, down_q=None, up_q=None)
    check_bits(bits, group_size)
    down_q = rtn_quantize(down, bits=bits, group_size=group_size)
    up_q = rtn_quantize(up, bits=bits, group_size=group_size)
    return LowRankWeight(down=down, up=up, down_q=down_q, up_q=up_q)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(S_r) V_r^T, U_r sqrt(S_r)) of an SVD U diag(S) V^T, truncated to ``rank``."""
    root = s[:rank].sqrt()
    return root.unsqueeze(1) * vh[:rank], u[:, :rank] * root.unsqueeze(0)


def svd_low_rank(weight: torch.Tensor, *, rank: int, bits: int = 16, group_size: int | None = 128) -> LowRankWeight:
    """Truncated SVD of ``weight`` [out, in] (the best rank-r fit in Frobenius norm).

    With ``bits < 16`` both factors are also rounded with ``rtn_quantize``.
    """
    _check_rank(weight, rank)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    down, up = _split(u, s, vh, rank)
    return _finish(down, up, bits, group_size)


def whitening_factor(stats: InputStats, *, damp: float = 1e-4) -> torch.Tensor:
    """Lower Cholesky factor S (float64 [in, in]) of X^T X + damping, X^T X = S S^T.

    The damping, ``damp`` times the mean diagonal (at least a tiny absolute floor so that all
    inputs dead still factorizes), keeps S invertible when some inputs are (nearly) never active;
    it is raised tenfold while the factorization fails.
    """
    if stats.xtx is None:
        raise ValueError("activation-aware SVD needs X^T X; collect the statistics with hessian=True")
    xtx = stats.xtx.double()
    mean_diag = max(float(torch.diagonal(xtx).mean()), 1e-12)
    eye = torch.eye(len(xtx), dtype=torch.float64, device=xtx.device)
    for attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(xtx + damp * 10**attempt * mean_diag * eye)
        if int(info) == 0:
            if attempt:
                logger.warning("input covariance needed damping %.3g to factorize", damp * 10**attempt)
            return factor
    raise ValueError("the input covariance could not be factorized even with heavy damping; are the statistics finite?")


def svd_llm_low_rank(
    weight: torch.Tensor,
    stats: InputStats,
    *,
    rank: int,
    bits: int = 16,
    group_size: int | None = 128,
    damp: float = 1e-4,
) -> LowRankWeight:
    """SVD-LLM's truncation-aware whitening: the rank-r factors minimizing the calibration output
    error. SVD of W S = U Σ V^T; down = Σ_r^1/2 V_r^T S^-1 (a triangular solve), up = U_r Σ_r^1/2.

    With ``bits < 16`` both factors are also rounded with ``rtn_quantize``.
    """
    _check_rank(weight, rank)
    stats.check_for(weight.shape[1])
    factor = whitening_factor(stats, damp=damp).to(weight.device)
    u, s, vh = torch.linalg.svd(weight.detach().double() @ factor, full_matrices=False)
    whitened_down, up = _split(u, s, vh, rank)
    # down = whitened_down @ S^-1, i.e. the solution D of D S = whitened_down.
    down = torch.linalg.solve_triangular(factor, whitened_down, upper=False, left=False)
    return _finish(down, up, bits, group_size)
