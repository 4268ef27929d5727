"""Calibration and evaluation token sets, and the dense model's reference distributions on them.

Search fitness is measured on calibration tokens; every reported figure on evaluation tokens the
search never saw. The built-in sets come from the standard-library corpus: calibration windows
from the training files, evaluation windows from the held-out files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from budgetpress.evaluators._corpus import list_corpus_files, read_stream
from budgetpress.space import Split

Encoder = Callable[[str], list[int]]


@dataclass(frozen=True, kw_only=True)
class TokenSpec:
    """How to build the token sets; plain data so it can travel to workers."""

    seq_len: int = 512
    calibration_sequences: int = 16
    evaluation_sequences: int = 16
    seed: int = 0
    text_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenSets:
    calibration: torch.Tensor  # int64 [n, seq_len]
    evaluation: torch.Tensor

    def for_split(self, split: Split) -> torch.Tensor:
        return self.calibration if split is Split.CALIBRATION else self.evaluation


def byte_encoder(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _random_windows(stream: np.ndarray, *, n: int, seq_len: int, seed: int) -> torch.Tensor:
    if len(stream) < seq_len + 1:
        raise ValueError(f"the calibration text has {len(stream)} tokens; at least {seq_len + 1} are needed")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - seq_len, size=n)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64))


def _consecutive_windows(stream: np.ndarray, *, n: int, seq_len: int) -> torch.Tensor:
    available = len(stream) // seq_len
    if available < n:
        raise ValueError(f"the evaluation text holds {available} windows of {seq_len} tokens; {n} are needed")
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).astype(np.int64))


# Tokenizing the whole corpus costs seconds at every worker start; a window needs only a stretch of
# text a few bytes per token long, doubled until it holds enough tokens.
_BYTES_PER_TOKEN_GUESS = 4


def _encode_bytes(data: np.ndarray, encode: Encoder) -> np.ndarray:
    return np.asarray(encode(data.tobytes().decode("utf-8", "replace")), dtype=np.int64)


def _enough_tokens(stretch: Callable[[int], np.ndarray], count: int, encode: Encoder) -> np.ndarray:
    """The tokens of ``stretch(span)`` for a span doubled until they number ``count`` or the stretch
    runs out of stream (comes back shorter than asked)."""
    span = count * _BYTES_PER_TOKEN_GUESS
    while True:
        data = stretch(span)
        tokens = _encode_bytes(data, encode)
        if len(tokens) >= count or len(data) < span:
            return tokens
        span *= 2


def _tokens_from(stream: np.ndarray, start: int, count: int, encode: Encoder) -> np.ndarray:
    """The first ``count`` tokens of the text at byte ``start`` (the text ending the stream if too little follows)."""
    tokens = _enough_tokens(lambda span: stream[start : start + span], count, encode)
    if len(tokens) >= count:
        return tokens[:count]
    tokens = _enough_tokens(lambda span: stream[max(0, len(stream) - span) :], count, encode)
    if len(tokens) < count:
        raise ValueError(f"the text has {len(tokens)} tokens; at least {count} are needed")
    return tokens[-count:]


def encoded_random_windows(stream: np.ndarray, encode: Encoder, *, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at random places in a byte stream, in ``encode``'s tokens."""
    if encode is byte_encoder:
        return _random_windows(stream, n=n, seq_len=seq_len, seed=seed)
    if len(stream) < seq_len + 1:
        raise ValueError(f"the calibration text has {len(stream)} bytes; at least {seq_len + 1} are needed")
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len, size=n)
    return torch.from_numpy(np.stack([_tokens_from(stream, int(start), seq_len, encode) for start in starts]))


def encoded_consecutive_windows(stream: np.ndarray, encode: Encoder, *, n: int, seq_len: int) -> torch.Tensor:
    """The first ``n`` windows of ``seq_len`` tokens of a byte stream, in ``encode``'s tokens."""
    if encode is byte_encoder:
        return _consecutive_windows(stream, n=n, seq_len=seq_len)
    # One window more than needed, so that the tokens kept never meet the cut through the text.
    tokens = _enough_tokens(lambda span: stream[:span], (n + 1) * seq_len, encode)
    return _consecutive_windows(tokens, n=n, seq_len=seq_len)


def builtin_token_sets(spec: TokenSpec, encode: Encoder) -> TokenSets:
    """Calibration from the corpus' training files, evaluation from its held-out files."""
    files = list_corpus_files()
    train = read_stream(files.root, files.train)
    heldout = read_stream(files.root, files.heldout)
    return TokenSets(
        calibration=encoded_random_windows(
            train, encode, n=spec.calibration_sequences, seq_len=spec.seq_len, seed=spec.seed
        ),
        evaluation=encoded_consecutive_windows(heldout, encode, n=spec.evaluation_sequences, seq_len=spec.seq_len),
    )


def text_file_token_sets(spec: TokenSpec, encode: Encoder) -> TokenSets:
    """A user's text files: every fifth window is held out for evaluation, the rest calibrate."""
    text = "\n".join(Path(name).read_text(encoding="utf-8") for name in spec.text_files)
    stream = np.asarray(encode(text), dtype=np.int64)
    windows = _consecutive_windows(stream, n=len(stream) // spec.seq_len, seq_len=spec.seq_len)
    heldout_mask = torch.arange(len(windows)) % 5 == 4
    calibration, evaluation = windows[~heldout_mask], windows[heldout_mask]
    if len(calibration) < spec.calibration_sequences or len(evaluation) < spec.evaluation_sequences:
        raise ValueError(
            f"the text files give {len(calibration)} calibration and {len(evaluation)} evaluation "
            f"windows of {spec.seq_len} tokens; {spec.calibration_sequences} and "
            f"{spec.evaluation_sequences} are needed"
        )
    return TokenSets(
        calibration=calibration[: spec.calibration_sequences], evaluation=evaluation[: spec.evaluation_sequences]
    )


def make_token_sets(spec: TokenSpec, encode: Encoder) -> TokenSets:
    return text_file_token_sets(spec, encode) if spec.text_files else builtin_token_sets(spec, encode)


def check_text_files(names: Sequence[str]) -> None:
    """Fail early, before any worker starts, on text files that cannot be read."""
    for name in names:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"text file {name!r} does not exist or is not a regular file")
