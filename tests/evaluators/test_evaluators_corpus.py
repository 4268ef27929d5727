from __future__ import annotations

import numpy as np

from budgetpress.evaluators._corpus import DOC_SEPARATOR, list_corpus_files, make_recall_sequence, read_stream


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
