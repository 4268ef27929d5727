"""Quality metrics against the dense model: next-token log-probs, KL divergence and perplexity."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def next_token_log_probs(model: PreTrainedModel, tokens: torch.Tensor, *, chunk: int = 4) -> torch.Tensor:
    """Log-softmax of the model's logits for every position, float32 [n, seq_len - 1, vocab], on the model's device."""
    parts = []
    for start in range(0, len(tokens), chunk):
        logits = model(input_ids=tokens[start : start + chunk].to(model.device)).logits[:, :-1].float()
        parts.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(parts)


def kl_and_ppl(dense_log_probs: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Mean per-token KL(dense ‖ compressed) in nats, and the compressed model's perplexity."""
    kl = (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(-1).mean()
    nll = -log_probs.gather(-1, targets.to(log_probs.device).unsqueeze(-1)).mean()
    return float(kl), math.exp(min(float(nll), 700.0))
