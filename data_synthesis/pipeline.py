"""Key-preserving SCP data synthesis (CLARA.md section 4): per passage, simple QA, complex QA and paraphrases, then a
verification loop that asks for QA on the key facts not yet covered, up to `max_rounds` rounds.

Every QA pair is checked against the passage before it is kept: its answer must be grounded in the passage, must
not be given away by its question, must survive being re-answered from the passage, and its question must not
nearly duplicate a kept one. Every rejection is counted by reason.
"""

import re
import string
from collections import Counter
from dataclasses import dataclass, field

from .backends import GenerationRequest, LLMBackend
from .parsing import ParseError, is_refusal, is_repetitive, parse_json, parse_qa_pairs, parse_text_field
from .prompts import render

__all__ = ["SynthesisConfig", "PassageResult", "synthesize_passages", "validate_qa", "normalize"]

_STOPWORDS = frozenset(
    "a an the of in on at to for by with from and or is are was were be been it its this that as which who what "
    "when where how why does do did".split()
)


@dataclass
class SynthesisConfig:
    r"""
    Knobs of the pipeline (each field's help says what it does; `clara synthesize --help` lists them).

    Example:

    ```python
    >>> config = SynthesisConfig(max_rounds=5, num_paraphrases=2)
    >>> run_synthesis("corpus.jsonl", "scp.jsonl", backend, config)
    ```
    """

    max_rounds: int = field(
        default=10, metadata={"help": "Verification rounds: each lists the uncovered key facts and asks QA for them."}
    )
    num_paraphrases: int = field(default=1, metadata={"help": "Paraphrase rows per passage."})
    complex_qa: bool = field(default=True, metadata={"help": "Also ask for multi-fact questions."})
    window_words: int = field(
        default=180,
        metadata={"help": "Passages longer than this many words are split into overlapping windows (256 compressor "
                  "tokens are roughly 180 words)."},
    )
    window_overlap: int = field(default=30, metadata={"help": "Words shared by consecutive windows."})
    min_answer_grounding: float = field(
        default=0.5, metadata={"help": "Share of an answer's content words that must occur in the passage."}
    )
    min_reanswer_f1: float = field(
        default=0.5, metadata={"help": "Token F1 between the answer and the passage-based re-answer needed to keep a pair."}
    )
    duplicate_threshold: float = field(
        default=0.8, metadata={"help": "Word-set Jaccard at which a question counts as a near-duplicate of a kept one."}
    )
    passages_per_batch: int = field(default=8, metadata={"help": "Passages whose requests go to the backend together."})

    def __post_init__(self):
        if self.max_rounds < 1 or self.num_paraphrases < 0 or self.passages_per_batch < 1:
            raise ValueError("max_rounds and passages_per_batch must be >= 1, num_paraphrases >= 0.")
        if not 0 <= self.window_overlap < self.window_words:
            raise ValueError("window_overlap must be >= 0 and smaller than window_words.")
        for name in ("min_answer_grounding", "min_reanswer_f1", "duplicate_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1.")


@dataclass
class PassageResult:
    passage_id: str
    text: str
    qa: list[dict[str, str]] = field(default_factory=list)
    paraphrases: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    coverage: float | None = None
    rounds: int = 0
    rejections: Counter = field(default_factory=Counter)

    def rows(self) -> list[dict]:
        """Rows in the reference SCP format (the stage-1 trainer reads them directly)."""
        common = {"docs": [self.text], "passage_id": self.passage_id, "coverage": self.coverage}
        rows = []
        if self.qa:
            rows.append(
                {
                    "data_type": "qa",
                    "question": [pair["question"] for pair in self.qa],
                    "answers": [pair["answer"] for pair in self.qa],
                    **common,
                }
            )
        rows += [{"data_type": "paraphrase", "question": [], "answers": [text], **common} for text in self.paraphrases]
        return rows

    def summary(self) -> dict:
        return {
            "passage_id": self.passage_id,
            "qa": len(self.qa),
            "paraphrases": len(self.paraphrases),
            "key_facts": len(self.facts),
            "coverage": self.coverage,
            "rounds": self.rounds,
            "rejections": dict(self.rejections),
        }


# ---------------------------------------------------------------- text checks


def normalize(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (the evaluation convention)."""
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def _content_words(text: str) -> list[str]:
    return [word for word in normalize(text).split() if word not in _STOPWORDS]


def _token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _grounding(text: str, passage_words: set[str]) -> float:
    words = _content_words(text) or normalize(text).split()
    return sum(word in passage_words for word in words) / max(len(words), 1)


def _latin_share(text: str) -> float:
    letters = [char for char in text if char.isalpha()]
    return sum(char.isascii() for char in letters) / max(len(letters), 1)


def _wrong_language(text: str, passage: str) -> bool:
    """A cheap script check: a Latin-script passage answered in another script, or the reverse."""
    return abs(_latin_share(text) - _latin_share(passage)) > 0.5


def _jaccard(first: str, second: str) -> float:
    a, b = set(normalize(first).split()), set(normalize(second).split())
    return len(a & b) / max(len(a | b), 1)


def validate_qa(pair: dict[str, str], passage: str, kept_questions: list[str], config: SynthesisConfig) -> str | None:
    """The reason to reject a QA pair before re-answering, or None."""
    question, answer = pair["question"], pair["answer"]
    if is_refusal(question) or is_refusal(answer):
        return "refusal"
    if is_repetitive(question) or is_repetitive(answer):
        return "repetitive"
    if _wrong_language(question + " " + answer, passage):
        return "wrong_language"
    normalized_answer = normalize(answer)
    if normalized_answer and f" {normalized_answer} " in f" {normalize(question)} ":
        return "answer_in_question"
    if _grounding(answer, set(normalize(passage).split())) < config.min_answer_grounding:
        return "answer_not_grounded"
    if any(_jaccard(question, kept) >= config.duplicate_threshold for kept in kept_questions):
        return "duplicate_question"
    return None


def _validate_paraphrase(text: str, passage: str, kept: list[str]) -> str | None:
    if is_refusal(text):
        return "refusal"
    if is_repetitive(text):
        return "repetitive"
    if _wrong_language(text, passage):
        return "wrong_language"
    ratio = len(text.split()) / max(len(passage.split()), 1)
    if not 0.3 <= ratio <= 1.5:
        return "paraphrase_length"
    if _grounding(text, set(normalize(passage).split())) < 0.5:
        return "paraphrase_not_grounded"
    if any(_jaccard(text, other) >= 0.95 for other in kept):
        return "duplicate_paraphrase"
    return None


# ---------------------------------------------------------------- the pipeline


def _request(task: str, **fields) -> GenerationRequest:
    return GenerationRequest(task, tuple((m["role"], m["content"]) for m in render(task, **fields)))


def _keep_checked_pairs(
    results: list[PassageResult], candidates: list[list[dict]], backend: LLMBackend, config: SynthesisConfig
) -> None:
    """Pre-checks each passage's candidate pairs, re-answers the survivors from the passage, keeps those that agree."""
    pending = []  # (result, pair)
    for result, pairs in zip(results, candidates):
        kept_questions = [pair["question"] for pair in result.qa]
        for pair in pairs:
            reason = validate_qa(pair, result.text, kept_questions, config)
            if reason:
                result.rejections[reason] += 1
            else:
                kept_questions.append(pair["question"])
                pending.append((result, pair))
    answers = backend.generate([_request("reanswer", passage=r.text, question=p["question"]) for r, p in pending])
    for (result, pair), response in zip(pending, answers):
        try:
            reanswer = parse_text_field(response, "answer")
        except ParseError:
            result.rejections["unparseable"] += 1
            continue
        agree = _token_f1(reanswer, pair["answer"]) >= config.min_reanswer_f1 or (
            normalize(pair["answer"]) and normalize(pair["answer"]) in normalize(reanswer)
        )
        if "NOT_IN_PASSAGE" in reanswer.upper():
            result.rejections["not_answerable"] += 1
        elif not agree:
            result.rejections["reanswer_disagrees"] += 1
        else:
            result.qa.append(pair)


def _parse_pairs(response: str, result: PassageResult) -> list[dict]:
    try:
        pairs, dropped = parse_qa_pairs(response)
    except ParseError:
        result.rejections["refusal" if is_refusal(response) else "unparseable"] += 1
        return []
    if dropped:
        result.rejections["malformed_pair"] += dropped
    return pairs


def synthesize_passages(passages: list[dict], backend: LLMBackend, config: SynthesisConfig) -> list[PassageResult]:
    """Runs the whole pipeline on a batch of `{"id", "text"}` passages; one backend call per step for the batch."""
    results = [PassageResult(p["id"], p["text"]) for p in passages]
    candidates = _first_drafts(results, backend, config)
    _keep_checked_pairs(results, candidates, backend, config)
    _verification_loop(results, backend, config)
    return results


def _first_drafts(results: list[PassageResult], backend: LLMBackend, config: SynthesisConfig) -> list[list[dict]]:
    """Simple and complex QA candidates (returned), key facts and checked paraphrases (stored on the results)."""
    tasks = ["simple_qa", "key_facts"] + (["complex_qa"] if config.complex_qa else [])
    requests = [_request(task, passage=r.text) for r in results for task in tasks]
    requests += [
        _request("paraphrase", passage=r.text, variant=n + 1) for r in results for n in range(config.num_paraphrases)
    ]
    responses = backend.generate(requests)
    per_passage = len(tasks)
    candidates = []
    for i, result in enumerate(results):
        answers = dict(zip(tasks, responses[i * per_passage : (i + 1) * per_passage]))
        pairs = _parse_pairs(answers["simple_qa"], result)
        if config.complex_qa:
            pairs += _parse_pairs(answers["complex_qa"], result)
        candidates.append(pairs)
        try:
            facts = parse_json(answers["key_facts"])
        except ParseError:
            facts = []
        facts = facts.get("facts", []) if isinstance(facts, dict) else facts
        result.facts = [f.strip() for f in facts if isinstance(f, str) and f.strip()] if isinstance(facts, list) else []
        if not result.facts:
            result.rejections["key_facts_unparseable"] += 1
    paraphrase_responses = responses[len(results) * per_passage :]
    for i, result in enumerate(results):
        for response in paraphrase_responses[i * config.num_paraphrases : (i + 1) * config.num_paraphrases]:
            try:
                text = parse_text_field(response, "paraphrase")
            except ParseError:
                result.rejections["refusal" if is_refusal(response) else "unparseable"] += 1
                continue
            reason = _validate_paraphrase(text.strip(), result.text, result.paraphrases)
            if reason:
                result.rejections[reason] += 1
            else:
                result.paraphrases.append(text.strip())
    return candidates


def _verification_loop(results: list[PassageResult], backend: LLMBackend, config: SynthesisConfig) -> None:
    """Up to `max_rounds` rounds: the verifier names the uncovered key facts, QA is asked for them and checked."""
    open_results = [r for r in results if r.facts]
    for round_number in range(1, config.max_rounds + 1):
        if not open_results:
            break
        verdicts = backend.generate([_coverage_request(r) for r in open_results])
        still_open, missing_facts = [], []
        for result, verdict in zip(open_results, verdicts):
            result.rounds = round_number
            missing = _missing_fact_numbers(verdict, len(result.facts))
            if missing is None:
                result.rejections["unparseable"] += 1
                missing = list(range(len(result.facts)))
            result.coverage = 1 - len(missing) / len(result.facts)
            if missing and round_number < config.max_rounds:
                still_open.append(result)
                missing_facts.append([result.facts[i] for i in missing])
        if not still_open:
            break
        more = backend.generate(
            [
                _request("more_qa", passage=r.text, facts="\n".join(f"- {fact}" for fact in facts))
                for r, facts in zip(still_open, missing_facts)
            ]
        )
        _keep_checked_pairs(still_open, [_parse_pairs(text, r) for r, text in zip(still_open, more)], backend, config)
        open_results = still_open


def _coverage_request(result: PassageResult) -> GenerationRequest:
    facts = "\n".join(f"{i + 1}. {fact}" for i, fact in enumerate(result.facts))
    qa = "\n".join(f"Q: {pair['question']} A: {pair['answer']}" for pair in result.qa) or "(none yet)"
    return _request("coverage", passage=result.text, facts=facts, qa=qa)


def _missing_fact_numbers(response: str, num_facts: int) -> list[int] | None:
    """0-based indices of the facts the verifier calls uncovered; None when its answer is unusable."""
    try:
        value = parse_json(response)
    except ParseError:
        return None
    missing = value.get("missing") if isinstance(value, dict) else value
    if not isinstance(missing, list):
        return None
    numbers = set()
    for item in missing:
        if isinstance(item, str) and re.fullmatch(r"\s*\d+\s*", item):
            item = int(item)
        if isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= num_facts:
            numbers.add(item - 1)
    return sorted(numbers)
