"""Every prompt of the pipeline, in one place. Change `PROMPT_VERSION` with any change to a prompt: the version and
the prompts are recorded in each output's metadata."""

import hashlib
import json

__all__ = ["PROMPT_VERSION", "PROMPTS", "render", "prompts_fingerprint"]

PROMPT_VERSION = "2"

SYSTEM = "You are a careful annotator. Use only the passage. Reply with JSON only, in the language of the passage."

PROMPTS = {
    "simple_qa": (
        "Passage:\n{passage}\n\n"
        "Write short questions, each about one atomic fact of the passage, with short answers copied from the "
        "passage. Do not put the answer in the question. Cover every fact.\n"
        'Reply as JSON, for example: [{{"question": "Who founded the company?", "answer": "Jane Doe"}}, '
        '{{"question": "In which year was it founded?", "answer": "1901"}}]'
    ),
    "complex_qa": (
        "Passage:\n{passage}\n\n"
        "Write questions that each need two or more facts of the passage together, with short answers from the "
        "passage. Do not put the answer in the question.\n"
        'Reply as JSON: [{{"question": "...", "answer": "..."}}, ...]'
    ),
    "paraphrase": (
        "Passage:\n{passage}\n\n"
        "Rewrite the passage in other words and another order, shorter if possible, keeping every fact and adding "
        "none. This is rewrite number {variant}: start it differently from the passage and from other rewrites.\n"
        'Reply as JSON: {{"paraphrase": "..."}}'
    ),
    "key_facts": (
        "Passage:\n{passage}\n\n"
        "List the key facts of the passage, one short sentence each.\n"
        'Reply as JSON: {{"facts": ["...", ...]}}'
    ),
    "coverage": (
        "Passage:\n{passage}\n\nKey facts:\n{facts}\n\nQuestions and answers:\n{qa}\n\n"
        "Which key facts (by number) are not asked about by any question?\n"
        'Reply as JSON: {{"missing": [numbers]}}'
    ),
    "more_qa": (
        "Passage:\n{passage}\n\nThese facts are not covered yet:\n{facts}\n\n"
        "Write one short question with a short answer from the passage for each of these facts. Do not put the "
        "answer in the question.\n"
        'Reply as JSON: [{{"question": "...", "answer": "..."}}, ...]'
    ),
    "reanswer": (
        "Passage:\n{passage}\n\nQuestion: {question}\n\n"
        "Answer from the passage only, as briefly as possible. If the passage does not say, answer NOT_IN_PASSAGE.\n"
        'Reply as JSON: {{"answer": "..."}}'
    ),
}


def render(task: str, **fields) -> list[dict[str, str]]:
    """The chat messages of one request."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[task].format(**fields)}]


def prompts_fingerprint() -> str:
    return hashlib.sha256(json.dumps([SYSTEM, PROMPTS], sort_keys=True).encode()).hexdigest()[:16]
