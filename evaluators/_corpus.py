"""The built-in text: the Python standard library's own source, plus synthetic recall sequences.

Every machine with Python has the standard library, so the built-in model can be trained and
evaluated offline anywhere. Files are split into train and held-out sets by a hash of their
relative path, so the split is the same on every machine and never depends on directory order.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DOC_SEPARATOR = 0  # byte 0 never occurs in source text, so it marks document starts
HELDOUT_MODULUS = 20  # one file in twenty, by path hash, is held out
MAX_FILE_BYTES = 300_000
_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "test",
        "tests",
        "idle_test",
        "lib-dynload",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "ensurepip",
        "turtledemo",
    }
)
_EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")


@dataclass(frozen=True, kw_only=True)
class CorpusFiles:
    """The standard library files of this interpreter, split into train and held-out."""

    root: Path
    train: tuple[str, ...]
    heldout: tuple[str, ...]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def _is_excluded(relative: Path) -> bool:
    if any(part in _EXCLUDED_DIRS or part.startswith(_EXCLUDED_PREFIXES) for part in relative.parts):
        return True
    return relative.name.startswith(_EXCLUDED_PREFIXES)


def list_corpus_files(root: Path | None = None) -> CorpusFiles:
    """The corpus files under ``root`` (default: this interpreter's standard library), sorted."""
    base = root if root is not None else stdlib_root()
    names: list[str] = []
    for path in base.rglob("*.py"):
        relative = path.relative_to(base)
        if _is_excluded(relative) or path.is_symlink() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        names.append(relative.as_posix())
    names.sort()
    train = tuple(n for n in names if not _is_heldout(n))
    heldout = tuple(n for n in names if _is_heldout(n))
    return CorpusFiles(root=base, train=train, heldout=heldout)


def read_stream(root: Path, names: tuple[str, ...]) -> np.ndarray:
    """Concatenate files as bytes, each preceded by the document separator, as a uint8 array."""
    chunks: list[bytes] = []
    for name in names:
        chunks.append(bytes([DOC_SEPARATOR]))
        chunks.append((root / name).read_bytes())
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()


def stream_sha256(stream: np.ndarray) -> str:
    return hashlib.sha256(stream.tobytes()).hexdigest()


_KEY_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)


@dataclass(frozen=True, kw_only=True)
class RecallSequence:
    """A key→value table, distracting code, then queries whose answers lie far back.

    ``answer_mask`` marks the bytes of the queried values: predicting them needs the table at
    the start of the sequence, so the sequence measures what a KV cache keeps.
    """

    tokens: np.ndarray
    answer_mask: np.ndarray


def _random_word(rng: np.random.Generator, length: int) -> bytes:
    return bytes(rng.choice(_KEY_ALPHABET, size=length).tolist())


def make_recall_sequence(rng: np.random.Generator, *, length: int, filler: np.ndarray) -> RecallSequence:
    """One recall sequence of exactly ``length`` bytes; ``filler`` supplies the distracting code."""
    n_pairs = max(2, min(10, length // 50))
    n_queries = max(1, min(5, n_pairs // 2))
    keys = [b"k" + _random_word(rng, 4) for _ in range(n_pairs)]
    values = [_random_word(rng, 4) for _ in range(n_pairs)]
    head = bytes([DOC_SEPARATOR]) + b"# recall\n"
    head += b"".join(k + b' = "' + v + b'"\n' for k, v in zip(keys, values, strict=True))
    queried = rng.choice(n_pairs, size=n_queries, replace=False)
    tail = b""
    answer_spans: list[tuple[int, int]] = []
    for index in queried:
        prefix = b"assert " + keys[index] + b' == "'
        start = len(tail) + len(prefix)
        answer_spans.append((start, start + len(values[index])))
        tail += prefix + values[index] + b'"\n'
    filler_length = length - len(head) - len(tail) - 1
    if filler_length < 0:
        raise ValueError(f"a recall sequence needs at least {len(head) + len(tail) + 1} bytes; got {length}")
    offset = int(rng.integers(0, len(filler) - filler_length))
    middle = filler[offset : offset + filler_length].tobytes().replace(bytes([DOC_SEPARATOR]), b"\n") + b"\n"
    data = head + middle + tail
    mask = np.zeros(length, dtype=bool)
    tail_start = len(head) + len(middle)
    for start, end in answer_spans:
        mask[tail_start + start : tail_start + end] = True
    return RecallSequence(tokens=np.frombuffer(data, dtype=np.uint8).copy(), answer_mask=mask)


def make_copy_sequence(rng: np.random.Generator, *, length: int, filler: np.ndarray) -> RecallSequence:
    """Code with one random string written twice, at a random distance: ``answer_mask`` marks the
    second copy after its first byte. Predicting it needs a lookup by content (find the earlier
    copy, read what follows), the skill recall rests on, and a model learns it from these rows
    far faster than from recall rows, whose answers are a few bytes in a hundred."""
    word_length = int(rng.integers(8, 40))
    if length < 2 * word_length + 8:
        raise ValueError(f"a copy sequence needs at least {2 * word_length + 8} bytes; got {length}")
    word = rng.choice(_KEY_ALPHABET, size=word_length)
    gap = int(rng.integers(4, length - 2 * word_length - 3))
    lead = int(rng.integers(0, length - 2 * word_length - gap + 1))
    offset = int(rng.integers(0, len(filler) - length))
    tokens = filler[offset : offset + length].copy()
    second = lead + word_length + gap
    tokens[lead : lead + word_length] = word
    tokens[second : second + word_length] = word
    mask = np.zeros(length, dtype=bool)
    mask[second + 1 : second + word_length] = True
    return RecallSequence(tokens=tokens, answer_mask=mask)
