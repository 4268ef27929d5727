from __future__ import annotations

import numpy as np

from budgetpress.evaluators._corpus import (
    DOC_SEPARATOR,
    list_corpus_files,
    make_copy_sequence,
    make_recall_sequence,
    read_stream,
)


def test_split_is_deterministic_and_disjoint() -> None:
    first, second = list_corpus_files(), list_corpus_files()
    assert first == second
    assert not set(first.train) & set(first.heldout)
    assert len(first.heldout) >= 10
    assert all(not name.startswith(("test/", "site-packages/")) for name in first.train)


def test_stream_marks_documents() -> None:
    files = list_corpus_files()
    stream = read_stream(files.root, files.heldout[:3])
    assert int((stream == DOC_SEPARATOR).sum()) == 3
    assert stream[0] == DOC_SEPARATOR


def test_recall_sequence_answers_come_from_the_table() -> None:
    rng = np.random.default_rng(5)
    filler = np.frombuffer(b"x = 1\n" * 200, dtype=np.uint8)
    sequence = make_recall_sequence(rng, length=513, filler=filler)
    assert len(sequence.tokens) == 513
    text = sequence.tokens.tobytes()
    answers = sequence.tokens[sequence.answer_mask].tobytes()
    assert len(answers) == 5 * 4
    for start in range(0, len(answers), 4):
        value = answers[start : start + 4]
        # each queried value appears in the table near the start, far before its query
        assert text.index(b'"' + value + b'"') < 200


def test_copy_sequence_writes_one_word_twice_and_masks_the_second_copy() -> None:
    rng = np.random.default_rng(3)
    filler = np.frombuffer(b"def f(x):\n    return x\n" * 100, dtype=np.uint8)
    for _ in range(50):
        sequence = make_copy_sequence(rng, length=129, filler=filler)
        assert len(sequence.tokens) == len(sequence.answer_mask) == 129
        answer = np.flatnonzero(sequence.answer_mask)
        assert len(answer) >= 7 and np.array_equal(answer, np.arange(answer[0], answer[-1] + 1))
        word = sequence.tokens[answer[0] - 1 : answer[-1] + 1]  # the masked bytes and the one before them
        earlier = sequence.tokens[: answer[0] - 1].tobytes()
        assert word.tobytes() in earlier  # the first copy lies before the second
        assert set(word.tobytes()) <= set(b"abcdefghijklmnopqrstuvwxyz0123456789")
