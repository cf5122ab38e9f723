"""Truthfulness trust set from a TruthfulQA CSV (2025 edition or the classic v1; paper appendix B.2.1).

Prompt template: "{question}\\n\\nAnswer:"; responses are " {answer}".

Pairing, per question (both editions): the correct answers are ``Best Answer`` followed by the
``Correct Answers`` list ("; "-separated), the incorrect ones ``Best Incorrect Answer`` (2025 edition
only) followed by the ``Incorrect Answers`` list, each de-duplicated in order. Pair k is (correct[k],
incorrect[k]) for k < min(len(correct), len(incorrect), pairs_per_question), after dropping answers
listed as both correct and incorrect (two questions of either edition list "Unknown" in both). With
the default of one pair per question that is Best Answer vs Best Incorrect Answer (2025) or vs the
first Incorrect Answer (v1): 790 and 817 pairs (1,504 / 1,551 with two per question, 2,456 / 2,515
with no cap). All pairs of a question share its ``group`` so a split keeps them together.
"""
from __future__ import annotations

from pathlib import Path

from .reading import DataError, iter_csv, text_field
from .records import TrustRecord

TEMPLATE = "{question}\n\nAnswer:"
REQUIRED = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def _answers(first: list[str], joined: str) -> list[str]:
    out: list[str] = []
    for answer in first + joined.split(";"):
        answer = answer.strip()
        if answer and answer not in out:
            out.append(answer)
    return out


def load_truthfulqa(path: str | Path, pairs_per_question: int = 1) -> list[TrustRecord]:
    """Trust records (proponent a correct answer, opponent an incorrect one), in file order.

    Raises:
        DataError: missing columns, a malformed row, a blank question or answer list, no records.
    """
    if pairs_per_question < 1:
        raise ValueError(f"pairs_per_question must be at least 1, got {pairs_per_question}")
    records = []
    for line_no, row in iter_csv(path, REQUIRED):
        question = text_field(path, line_no, row, "Question").strip()
        correct = _answers([text_field(path, line_no, row, "Best Answer")], row["Correct Answers"])
        best_incorrect = [row["Best Incorrect Answer"]] if row.get("Best Incorrect Answer") else []
        incorrect = _answers(best_incorrect, row["Incorrect Answers"])
        contested = set(correct) & set(incorrect)
        correct = [a for a in correct if a not in contested]
        incorrect = [a for a in incorrect if a not in contested]
        if not correct:
            raise DataError(f"{path}:{line_no}: no correct answer for {question!r}")
        if not incorrect:
            raise DataError(f"{path}:{line_no}: no incorrect answer for {question!r}")
        prompt = TEMPLATE.format(question=question)
        for good, bad in list(zip(correct, incorrect))[:pairs_per_question]:
            records.append(TrustRecord(prompt, " " + good, " " + bad, group=question, source=f"{path}:{line_no}"))
    if not records:
        raise DataError(f"{path}: no TruthfulQA rows")
    return records
