"""Reading and validating the data of the three training stages and of evaluation (the reference formats, CLARA.md
section 5).

Every row is checked before training starts: its format here, and what the stage's collator will make of it (the
trainers pass `check_rows`). A malformed row raises `MalformedRowError` naming the file and line, or, with
`skip_malformed=True`, is skipped and counted by reason in a logged summary.
"""

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset

from modeling_clara import TRAINING_STAGES
from modeling_clara.jsonl import read_jsonl

logger = logging.getLogger(__name__)

__all__ = ["DATA_FORMATS", "MalformedRowError", "load_rows", "validate_row"]

DATA_FORMATS = (*TRAINING_STAGES, "evaluate")
CHECK_CHUNK_ROWS = 1024  # rows per `check_rows` call: tokenized together, bounded memory


class MalformedRowError(ValueError):
    """A data row that does not have its reference format."""


def _nonempty_string(value, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MalformedRowError(f"'{field}' must be a non-empty string")
    return value


def _string_list(value, field: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise MalformedRowError(f"'{field}' must be a non-empty list of strings")
    return [_nonempty_string(item, f"{field}[{i}]") for i, item in enumerate(value)]


def _answer(row: dict) -> str:
    """The training target of stages 2 and 3: `answer`, else `gold_answer` (the reference README and code differ)."""
    for field in ("answer", "gold_answer"):
        value = row.get(field)
        if isinstance(value, list) and value:
            value = value[0]
        if value is not None:
            return _nonempty_string(value, field)
    raise MalformedRowError("needs 'answer' or 'gold_answer'")


def validate_row(row, data_format: str, min_documents: int = 1) -> dict:
    """Returns the row in its format's canonical columns, or raises `MalformedRowError` saying what is wrong.

    - scp: `data_type` ("qa" or "paraphrase"), `questions`, `answers`, `document`.
    - instruct: `question`, `documents`, `answer`.
    - joint: `question`, `documents` (at least `min_documents`: the top-k), `answer`, `positives` (indices into
      documents; empty when unknown).
    - evaluate: `question`, `documents`, `answers` (every gold alias, from `golden_answers` or `answer`),
      `positives`.
    """
    if not isinstance(row, dict):
        raise MalformedRowError(f"a row must be a JSON object, got {type(row).__name__}")
    if data_format == "scp":
        data_type = row.get("data_type")
        if data_type not in ("qa", "paraphrase"):
            raise MalformedRowError(f"'data_type' must be 'qa' or 'paraphrase', got {data_type!r}")
        documents = _string_list(row.get("docs"), "docs")
        if len(documents) != 1:
            raise MalformedRowError(f"an SCP row compresses one document, got {len(documents)} in 'docs'")
        answers = _string_list(row.get("answers"), "answers")
        questions = _string_list(row.get("question"), "question") if data_type == "qa" else []
        if data_type == "qa" and len(questions) != len(answers):
            raise MalformedRowError(f"{len(questions)} questions but {len(answers)} answers")
        if data_type == "paraphrase" and len(answers) != 1:
            raise MalformedRowError(f"a paraphrase row has one answer (its target), got {len(answers)}: one row each")
        return {"data_type": data_type, "questions": questions, "answers": answers, "document": documents[0]}
    if data_format not in DATA_FORMATS:
        raise ValueError(f"Unknown data format {data_format!r}; choose from {DATA_FORMATS}.")
    canonical = {
        "question": _nonempty_string(row.get("question"), "question"),
        "documents": _string_list(row.get("docs"), "docs"),
    }
    if data_format == "evaluate":
        answers = row.get("golden_answers", row.get("answer"))
        canonical["answers"] = _string_list([answers] if isinstance(answers, str) else answers, "golden_answers")
    else:
        canonical["answer"] = _answer(row)
    if len(canonical["documents"]) < min_documents:
        raise MalformedRowError(
            f"{len(canonical['documents'])} candidate documents in 'docs', fewer than the top-k ({min_documents})"
        )
    if data_format in ("joint", "evaluate"):
        positives = row.get("pos_index", [])
        if not isinstance(positives, list) or not all(
            isinstance(i, int) and 0 <= i < len(canonical["documents"]) for i in positives
        ):
            raise MalformedRowError(f"'pos_index' must be a list of indices into 'docs', got {positives!r}")
        canonical["positives"] = positives
    return canonical


def load_rows(
    path: str | Path,
    data_format: str,
    skip_malformed: bool = False,
    min_documents: int = 1,
    check_rows: Callable[[list[dict]], list[str | None]] | None = None,
) -> Dataset:
    """Reads a JSONL file of one reference format (`DATA_FORMATS`) into a `datasets.Dataset` of canonical rows (see
    `validate_row`; `min_documents` applies to all but scp).

    `check_rows` takes canonical rows and returns, per row, why it would fail later (e.g. in the collator) or None;
    such rows are malformed too.
    """
    path = Path(path)
    rows, line_numbers, skipped = [], [], Counter()

    def refuse(line_number: int, reason: str) -> None:
        if not skip_malformed:
            raise MalformedRowError(f"{path}:{line_number}: {reason} (pass skip_malformed_rows to skip such rows)")
        skipped[reason] += 1

    for line_number, value, problem in read_jsonl(path):
        try:
            if problem:
                raise MalformedRowError(problem)
            rows.append(validate_row(value, data_format, min_documents))
            line_numbers.append(line_number)
        except MalformedRowError as error:
            refuse(line_number, str(error))
    if check_rows is not None:
        checked_rows = []
        for start in range(0, len(rows), CHECK_CHUNK_ROWS):
            chunk = rows[start : start + CHECK_CHUNK_ROWS]
            for row, line_number, reason in zip(chunk, line_numbers[start:], check_rows(chunk)):
                if reason:
                    refuse(line_number, reason)
                else:
                    checked_rows.append(row)
        rows = checked_rows
    if skipped:
        summary = "; ".join(f"{count} x {reason}" for reason, count in skipped.most_common())
        logger.warning("Skipped %d malformed row(s) of %s: %s", sum(skipped.values()), path, summary)
    if not rows:
        raise ValueError(f"{path} holds no usable {data_format} rows.")
    return Dataset.from_list(rows)
