"""Scoring KV settings the way a KV cache is used: prefill a context, compress it, score what follows.

Protocol, per batch of equal-length sequences ``tokens [n, L]`` and a prefill length ``P``:

1. a fresh cache for the plan (``PlanKVCache.from_plan``) takes a prefill of ``tokens[:, :P]``; the prefill
   attends at full precision, then each layer stores, quantizes and evicts per its ``KVSetting`` (SnapKV
   scores with the prefill's own queries);
2. one teacher-forced forward of the continuation ``tokens[:, P:]`` with that cache: every continuation
   query attends to the compressed prefill cache plus the continuation tokens before it (those at full
   precision: the forward hands them to attention before the layer stores them).

Position convention: row ``r`` of the result holds the log-probs that predict ``tokens[:, P + 1 + r]``
(``r`` in ``0 .. L - P - 2``), so the targets are ``continuation_targets(tokens, P) = tokens[:, P + 1:]``.
These are rows ``P ..`` of :func:`next_token_log_probs` (whose row ``j`` predicts token ``j + 1``); a dense
plan reproduces them. The prediction of ``tokens[:, P]`` comes from the prefill's last position, which
attends before anything is compressed, so no plan changes it and it is left out.

The full-precision part of a cache is stored in the states' dtype: a model run in float32 keeps its "16-bit"
tokens in float32. Compare a plan only with a dense reference computed on the same model in the same dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from budgetpress.evaluators._corpus import list_corpus_files, make_recall_sequence, read_stream
from budgetpress.evaluators._data import (
    Encoder,
    TokenSpec,
    byte_encoder,
    check_text_files,
    encoded_consecutive_windows,
    encoded_random_windows,
    text_file_token_sets,
)
from budgetpress.evaluators._metrics import kl_and_ppl
from budgetpress.kernels import PlanKVCache, use_plan_kv_attention_
from budgetpress.space import Plan, Split

logger = logging.getLogger(__name__)

CacheFactory = Callable[[], Cache]
# Seeds of the two splits' generators: distinct, so the splits never share a random draw.
_SPLIT_STREAMS = {Split.CALIBRATION: 0, Split.EVALUATION: 1}


@dataclass(frozen=True, kw_only=True)
class KVTokenSpec:
    """How to build KV evaluation sequences; plain data, so it can travel to workers.

    Each sequence is ``prefill_len + continuation_len`` tokens. The defaults fill the built-in model's
    512-token training length; its recall sequences then put the key→value table in the prefill and every
    query (115 bytes) in the continuation. ``recall_fraction`` of the built-in corpus' sequences are recall
    sequences (needs the byte encoder); user ``text_files`` give plain windows only.
    """

    prefill_len: int = 384
    continuation_len: int = 128
    calibration_sequences: int = 16
    evaluation_sequences: int = 16
    recall_fraction: float = 0.25
    seed: int = 0
    text_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prefill_len < 1 or self.continuation_len < 2:
            raise ValueError(
                "prefill_len must be >= 1 and continuation_len >= 2 (one continuation position is scored per "
                f"token after the first); got {self.prefill_len} and {self.continuation_len}"
            )
        if self.calibration_sequences < 1 or self.evaluation_sequences < 1:
            raise ValueError(
                "calibration_sequences and evaluation_sequences must be >= 1; got "
                f"{self.calibration_sequences} and {self.evaluation_sequences}"
            )
        if not 0.0 <= self.recall_fraction <= 1.0:
            raise ValueError(f"recall_fraction must be in [0, 1]; got {self.recall_fraction!r}")

    @property
    def seq_len(self) -> int:
        return self.prefill_len + self.continuation_len

    def n_sequences(self, split: Split) -> int:
        return self.calibration_sequences if split is Split.CALIBRATION else self.evaluation_sequences


@dataclass(frozen=True)
class KVSequences:
    """Sequences of one split: ``tokens`` int64 ``[n, L]``, ``answer_mask`` bool ``[n, L]``, ``prefill_len``.

    ``answer_mask`` marks recall answers (all in the continuation); it is all False for plain windows.
    """

    tokens: torch.Tensor
    answer_mask: torch.Tensor
    prefill_len: int

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.answer_mask.shape != self.tokens.shape:
            raise ValueError(
                f"tokens must be [n, L] and answer_mask the same shape; got {tuple(self.tokens.shape)} and "
                f"{tuple(self.answer_mask.shape)}"
            )
        if not 1 <= self.prefill_len <= self.tokens.shape[1] - 2:
            raise ValueError(
                f"prefill_len must be in [1, L - 2] for L = {self.tokens.shape[1]}; got {self.prefill_len}"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def targets(self) -> torch.Tensor:
        return continuation_targets(self.tokens, self.prefill_len)

    def head(self, n: int) -> KVSequences:
        """The first ``n`` sequences (recall and plain ones are interleaved, so a head holds both)."""
        return KVSequences(self.tokens[:n], self.answer_mask[:n], self.prefill_len)


@dataclass(frozen=True)
class KVTokenSets:
    calibration: KVSequences
    evaluation: KVSequences

    def for_split(self, split: Split) -> KVSequences:
        return self.calibration if split is Split.CALIBRATION else self.evaluation


@dataclass(frozen=True, kw_only=True)
class KVEvaluation:
    """Quality of one KV plan on continuation tokens; ``recall_accuracy`` is None without recall answers."""

    kl: float
    ppl: float
    recall_accuracy: float | None
    tokens: int
    answer_tokens: int


# -- building sequences ----------------------------------------------------------------------------------------


def _is_recall_row(index: int, fraction: float) -> bool:
    # Spread recall rows evenly, so that any first k rows (a low-fidelity evaluation) hold their share.
    return math.floor((index + 1) * fraction + 1e-9) > math.floor(index * fraction + 1e-9)


def _answer_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [(int(start), int(end)) for start, end in zip(edges[::2], edges[1::2], strict=True)]


def _recall_row(rng: np.random.Generator, filler: np.ndarray, spec: KVTokenSpec) -> tuple[np.ndarray, np.ndarray]:
    sequence = make_recall_sequence(rng, length=spec.seq_len, filler=filler)
    spans = _answer_spans(sequence.answer_mask)
    # Predicting tokens[P] is not scored (see the module docstring), so every answer must come after it.
    if not spans or spans[0][0] <= spec.prefill_len:
        first = spans[0][0] if spans else "-"
        raise ValueError(
            f"recall sequences of {spec.seq_len} tokens put an answer at position {first}, not after the prefill "
            f"of {spec.prefill_len}: lengthen continuation_len or set recall_fraction=0"
        )
    data = sequence.tokens.tobytes()
    for start, end in spans:
        # The first occurrence of a value is its line in the table, which the prefill must hold.
        if data.find(data[start:end]) + end - start > spec.prefill_len:
            raise ValueError(f"the recall table of a {spec.seq_len}-token sequence does not fit the prefill")
    return sequence.tokens.astype(np.int64), sequence.answer_mask


def _mixed_split(
    windows: torch.Tensor, filler: np.ndarray, spec: KVTokenSpec, split: Split, *, recall: bool
) -> KVSequences:
    """Rows of ``windows`` with every recall row replaced by a recall sequence drawn from ``filler``."""
    tokens = windows.clone()
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    rng = np.random.default_rng([spec.seed, _SPLIT_STREAMS[split], 1])
    for row in range(len(tokens)):
        if recall and _is_recall_row(row, spec.recall_fraction):
            row_tokens, row_mask = _recall_row(rng, filler, spec)
            tokens[row] = torch.from_numpy(row_tokens)
            mask[row] = torch.from_numpy(row_mask)
    return KVSequences(tokens, mask, spec.prefill_len)


def builtin_kv_token_sets(spec: KVTokenSpec, encode: Encoder = byte_encoder) -> KVTokenSets:
    """The built-in corpus: calibration from its training files, evaluation from its held-out files.

    Calibration windows are drawn at random (from ``seed``), evaluation windows are consecutive from the
    start of the held-out stream; recall rows take their distracting code from the same split's files.
    Recall sequences are bytes, so any other encoder gets plain windows only.
    """
    recall = spec.recall_fraction > 0 and encode is byte_encoder
    if spec.recall_fraction > 0 and not recall:
        logger.info("recall sequences are byte-level; a model with its own tokenizer gets plain windows only")
    files = list_corpus_files()
    train = read_stream(files.root, files.train)
    heldout = read_stream(files.root, files.heldout)
    n_cal, n_eval, length = spec.calibration_sequences, spec.evaluation_sequences, spec.seq_len
    calibration = encoded_random_windows(train, encode, n=n_cal, seq_len=length, seed=spec.seed)
    evaluation = encoded_consecutive_windows(heldout, encode, n=n_eval, seq_len=length)
    return KVTokenSets(
        calibration=_mixed_split(calibration, train, spec, Split.CALIBRATION, recall=recall),
        evaluation=_mixed_split(evaluation, heldout, spec, Split.EVALUATION, recall=recall),
    )


def text_file_kv_token_sets(spec: KVTokenSpec, encode: Encoder) -> KVTokenSets:
    """A user's text files: plain windows (no recall), every fifth one held out, as ``text_file_token_sets``."""
    check_text_files(spec.text_files)
    plain = TokenSpec(
        seq_len=spec.seq_len,
        calibration_sequences=spec.calibration_sequences,
        evaluation_sequences=spec.evaluation_sequences,
        seed=spec.seed,
        text_files=spec.text_files,
    )
    sets = text_file_token_sets(plain, encode)

    def unmasked(tokens: torch.Tensor) -> KVSequences:
        return KVSequences(tokens, torch.zeros_like(tokens, dtype=torch.bool), spec.prefill_len)

    return KVTokenSets(calibration=unmasked(sets.calibration), evaluation=unmasked(sets.evaluation))


def make_kv_token_sets(spec: KVTokenSpec, encode: Encoder = byte_encoder) -> KVTokenSets:
    """The KV sequences of both splits: from ``spec.text_files`` if given, else the built-in corpus."""
    return text_file_kv_token_sets(spec, encode) if spec.text_files else builtin_kv_token_sets(spec, encode)


# -- scoring ---------------------------------------------------------------------------------------------------


def continuation_targets(tokens: torch.Tensor, prefill_len: int) -> torch.Tensor:
    """The tokens that the rows of :func:`kv_continuation_log_probs` predict: ``tokens[:, prefill_len + 1:]``."""
    return tokens[:, prefill_len + 1 :]


def _n_layers(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    return int(config.num_hidden_layers)


def _cache_factory(model: PreTrainedModel, plan: Plan | CacheFactory) -> CacheFactory:
    if not isinstance(plan, Plan):
        return plan
    n_layers = _n_layers(model)
    return lambda: PlanKVCache.from_plan(plan, n_layers=n_layers)


@torch.no_grad()
def _continuation_batch(model: PreTrainedModel, tokens: torch.Tensor, prefill_len: int, cache: Cache) -> torch.Tensor:
    # The prefill's logits are not scored; keeping one position saves the full-vocabulary projection.
    model(input_ids=tokens[:, :prefill_len], cache=cache, use_cache=True, logits_to_keep=1)
    logits = model(input_ids=tokens[:, prefill_len:], cache=cache, use_cache=True).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def kv_continuation_log_probs(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    *,
    prefill_len: int,
    plan: Plan | CacheFactory,
    chunk: int = 8,
) -> torch.Tensor:
    """Float32 log-probs ``[n, L - prefill_len - 1, vocab]`` of the continuation under a compressed cache.

    ``plan``: a plan (its ``kv.<layer>`` settings; a fresh ``PlanKVCache`` per batch of ``chunk`` rows) or a
    factory of fresh caches. Row ``r`` predicts ``tokens[:, prefill_len + 1 + r]`` (module docstring). The
    model is wired with ``use_plan_kv_attention_`` first (idempotent; other caches and plain forwards are
    unaffected). The result lies on ``tokens``' device.
    """
    if tokens.ndim != 2 or not 1 <= prefill_len <= tokens.shape[1] - 2:
        raise ValueError(
            f"tokens must be [n, L] with 1 <= prefill_len <= L - 2; got shape {tuple(tokens.shape)} and "
            f"prefill_len={prefill_len}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    use_plan_kv_attention_(model)
    make_cache = _cache_factory(model, plan)
    device = model.device
    parts = [
        _continuation_batch(model, tokens[start : start + chunk].to(device), prefill_len, make_cache())
        for start in range(0, len(tokens), chunk)
    ]
    return torch.cat(parts).to(tokens.device)


def recall_accuracy(
    log_probs: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor, prefill_len: int
) -> float:
    """Fraction of answer tokens after the prefill that the argmax predicts; NaN if there are none."""
    mask = continuation_targets(answer_mask, prefill_len).to(log_probs.device)
    if not bool(mask.any()):
        return math.nan
    targets = continuation_targets(tokens, prefill_len).to(log_probs.device)
    correct = log_probs.argmax(dim=-1) == targets
    return float(correct[mask].float().mean())


def evaluate_kv(
    model: PreTrainedModel,
    sequences: KVSequences,
    plan: Plan | CacheFactory,
    *,
    dense_log_probs: torch.Tensor | None = None,
    chunk: int = 8,
) -> KVEvaluation:
    """KL to the dense cache, perplexity and recall accuracy of ``plan`` on ``sequences``' continuations.

    ``dense_log_probs`` (the same protocol under a dense plan, ``Plan({})``) is computed when not given.
    """
    prefill = sequences.prefill_len
    if dense_log_probs is None:
        dense_log_probs = kv_continuation_log_probs(
            model, sequences.tokens, prefill_len=prefill, plan=Plan({}), chunk=chunk
        )
    log_probs = kv_continuation_log_probs(model, sequences.tokens, prefill_len=prefill, plan=plan, chunk=chunk)
    targets = sequences.targets
    kl, ppl = kl_and_ppl(dense_log_probs, log_probs, targets)
    recall = recall_accuracy(log_probs, sequences.tokens, sequences.answer_mask, prefill)
    n_answers = int(continuation_targets(sequences.answer_mask, prefill).sum())
    return KVEvaluation(
        kl=kl,
        ppl=ppl,
        recall_accuracy=None if math.isnan(recall) else recall,
        tokens=int(targets.numel()),
        answer_tokens=n_answers,
    )
