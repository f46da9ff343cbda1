"""The LLM's output is untrusted text: find the JSON in it and repair what is commonly broken."""

import json
import re
from collections import Counter

__all__ = ["ParseError", "parse_json", "parse_qa_pairs", "parse_text_field", "is_refusal", "is_repetitive"]


class ParseError(ValueError):
    """No usable JSON in a response, even after repair."""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_REFUSAL = re.compile(r"\b(I can(?:no|')t|I am unable|I'm unable|as an AI|I'm sorry|I apologi[sz]e)\b", re.IGNORECASE)


_LABELLED_PAIR = re.compile(
    r"^\s*(?:\d+[.)]\s*)?(?:Question|Q)\s*[:.]\s*(.+?)\s*$\s*^\s*(?:Answer|A)\s*[:.]\s*(.+?)\s*$",
    re.IGNORECASE | re.MULTILINE,
)


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


def is_repetitive(text: str) -> bool:
    """Degenerate looping output (common with small models): a word trigram four times or more, or fewer than
    half of the trigrams distinct."""
    words = text.lower().split()
    trigrams = Counter(zip(words, words[1:], words[2:]))
    total = sum(trigrams.values())
    return total >= 8 and (trigrams.most_common(1)[0][1] >= 4 or len(trigrams) / total < 0.5)


def _close_truncated(text: str) -> str:
    """Closes an output cut off by the length limit: keeps everything up to the last complete element and closes
    the brackets still open there."""
    stack, in_string, escaped = [], False, False
    last_cut = None  # (position after a closing bracket, brackets still open there)
    for i, char in enumerate(text):
        if in_string:
            if char == '"' and not escaped:
                in_string = False
            escaped = char == "\\" and not escaped
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            stack.append("]" if char == "[" else "}")
        elif char in "]}" and stack:
            stack.pop()
            last_cut = (i + 1, list(stack))
    if not stack or last_cut is None:
        return text
    position, still_open = last_cut
    return text[:position] + "".join(reversed(still_open))


def parse_json(text: str):
    """The first JSON value in `text`: inside a code fence or after leading prose; repairs trailing commas,
    Python literals and truncation. Raises `ParseError`."""
    if not isinstance(text, str) or not text.strip():
        raise ParseError("empty response")
    fenced = _FENCE.search(text)
    candidate = fenced.group(1) if fenced else text
    starts = [i for i in (candidate.find("["), candidate.find("{")) if i >= 0]
    if not starts:
        raise ParseError("no JSON in the response")
    candidate = candidate[min(starts):].strip()
    attempts = [candidate]
    repaired = _TRAILING_COMMA.sub(r"\1", candidate)
    repaired = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", repaired)))
    attempts += [repaired, _close_truncated(repaired)]
    for attempt in attempts:
        try:
            return json.JSONDecoder().raw_decode(attempt)[0]
        except json.JSONDecodeError:
            continue
    raise ParseError("JSON could not be repaired")


def parse_qa_pairs(text: str) -> tuple[list[dict[str, str]], int]:
    """`([{"question", "answer"}], dropped)` from a response: a JSON list (or a `{"questions": [...]}`-style wrapper),
    or else "Question: ...\nAnswer: ..." lines. Items that are not pairs of non-empty strings are dropped and
    counted. Raises `ParseError` when the response holds neither."""
    try:
        value = parse_json(text)
    except ParseError:
        pairs = [{"question": q, "answer": a} for q, a in _LABELLED_PAIR.findall(text or "")]
        if not pairs:
            raise
        return pairs, 0
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if lists else [value]
    if not isinstance(value, list):
        raise ParseError("expected a list of question/answer pairs")
    pairs = []
    for item in value:
        if not isinstance(item, dict):
            continue
        question, answer = item.get("question", item.get("q")), item.get("answer", item.get("a"))
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
            pairs.append({"question": question.strip(), "answer": answer.strip()})
    return pairs, len(value) - len(pairs)


def parse_text_field(text: str, field: str) -> str:
    """`value[field]` of a JSON object response, or else the whole response as plain text (a label such as
    "Paraphrase:" removed). Raises `ParseError` on an empty response."""
    try:
        value = parse_json(text)
    except ParseError:
        value = None
    if isinstance(value, dict) and isinstance(value.get(field), (str, int, float)) and not isinstance(value.get(field), bool):
        result = str(value[field]).strip()
    elif value is None:
        result = re.sub(rf"^\s*{re.escape(field)}\s*:\s*", "", text or "", flags=re.IGNORECASE).strip()
    else:
        raise ParseError(f"JSON without a '{field}'")
    if not result:
        raise ParseError(f"empty {field}")
    return result
