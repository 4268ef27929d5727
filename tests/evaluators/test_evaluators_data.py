"""Token windows for models with their own tokenizer: drawn from stretches of text, never the whole corpus."""

from __future__ import annotations

import numpy as np
import pytest

from budgetpress.evaluators._corpus import DOC_SEPARATOR
from budgetpress.evaluators._data import encoded_consecutive_windows, encoded_random_windows


def _word_encoder(text: str) -> list[int]:
    """A tokenizer whose tokens span several bytes, like a real one: one id per whitespace-separated word."""
    return [hash(word) % 50_000 for word in text.split()]


def _stream(n_words: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = [f"w{int(i)}" for i in rng.integers(0, 1000, size=n_words)]
    return np.frombuffer(bytes([DOC_SEPARATOR]) + " ".join(words).encode(), dtype=np.uint8).copy()


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((windows == needle).all(axis=1).any())


def test_consecutive_windows_are_the_start_of_the_whole_encoding() -> None:
    stream = _stream(20_000)
    whole = np.asarray(_word_encoder(stream.tobytes().decode()), dtype=np.int64)
    windows = encoded_consecutive_windows(stream, _word_encoder, n=3, seq_len=64)
    assert windows.shape == (3, 64)
    assert np.array_equal(windows.numpy().ravel(), whole[: 3 * 64])


def test_random_windows_are_stretches_of_the_whole_encoding() -> None:
    stream = _stream(20_000)
    whole = np.asarray(_word_encoder(stream.tobytes().decode()), dtype=np.int64)
    windows = encoded_random_windows(stream, _word_encoder, n=8, seq_len=64, seed=3)
    assert windows.shape == (8, 64)
    # A window may start inside a word (its first id then differs); the rest lies in the whole text.
    for row in windows.numpy():
        assert _contains(whole, row[1:])
    again = encoded_random_windows(stream, _word_encoder, n=8, seq_len=64, seed=3)
    assert np.array_equal(windows.numpy(), again.numpy())


def test_a_window_near_the_end_takes_the_text_that_ends_the_stream() -> None:
    stream = _stream(200)
    windows = encoded_random_windows(stream, _word_encoder, n=20, seq_len=150, seed=0)
    whole = np.asarray(_word_encoder(stream.tobytes().decode()), dtype=np.int64)
    assert windows.shape == (20, 150)
    for row in windows.numpy():
        assert _contains(whole, row[1:])


def test_too_little_text_is_refused_with_the_counts() -> None:
    with pytest.raises(ValueError, match="holds 0 windows of 64 tokens; 1 are needed"):
        encoded_consecutive_windows(_stream(30), _word_encoder, n=1, seq_len=64)
    with pytest.raises(ValueError, match="at least 500 are needed"):
        encoded_random_windows(_stream(300), _word_encoder, n=1, seq_len=500, seed=0)
