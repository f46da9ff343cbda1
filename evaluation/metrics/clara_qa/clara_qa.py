"""CLaRa's answer metrics (CLARA.md section 6) as a local `evaluate` metric: load it offline by path,
`evaluate.load("evaluation/metrics/clara_qa")`.

Answers and predictions are normalised (lowercase, punctuation and the articles a/an/the dropped, spaces collapsed).
Per example, each metric is the best over the gold aliases; the `_first` variants score only the first alias, as the
reference code (and the paper's tables) do.
- exact_match: the normalised prediction equals a normalised alias.
- f1: token F1 between the prediction and an alias.
- cover: every token of an alias appears in the prediction (the paper's "accuracy").
All are percentages.
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "Exact match, token F1 and cover (all gold tokens in the prediction), best over aliases and first alias."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers.
    references: list of lists of gold aliases (at least one per example).
Returns:
    exact_match, f1, cover, exact_match_first, f1_first, cover_first: percentages averaged over examples.
Example:
    >>> metric = evaluate.load("evaluation/metrics/clara_qa")
    >>> metric.compute(predictions=["Paris."], references=[["Paris", "City of Light"]])["exact_match"]
    100.0
"""
_CITATION = "CLaRa, arXiv 2511.18659."
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(predicted) & Counter(gold)).values())
    if not predicted or not gold or common == 0:
        return float(predicted == gold)
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def cover(prediction: str, answer: str) -> float:
    predicted, gold = set(normalize_answer(prediction).split()), normalize_answer(answer).split()
    return float(bool(gold) and all(token in predicted for token in gold))


SCORERS = {"exact_match": exact_match, "f1": token_f1, "cover": cover}


def score_example(prediction: str, answers: list[str]) -> dict[str, float]:
    """The six per-example scores (fractions, not percentages)."""
    if not answers:
        raise ValueError("Every example needs at least one gold answer.")
    scores = {}
    for name, scorer in SCORERS.items():
        scores[name] = max(scorer(prediction, answer) for answer in answers)
        scores[f"{name}_first"] = scorer(prediction, answers[0])
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClaraQA(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references) or not predictions:
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
        totals = Counter()
        for prediction, answers in zip(predictions, references):
            totals.update(score_example(prediction, list(answers)))
        return {name: 100.0 * total / len(predictions) for name, total in totals.items()}
