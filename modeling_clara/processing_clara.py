"""CLaRa processor: the text side of a CLaRa model.

The tokenizer with CLaRa's added tokens (`<MEM0>..<MEM{n-1}>`, `<ENC>`, `<SEP>`), the document length the
compressor reads, the generator's prompt, and the two tokenize functions: `tokenize_for_compression` (documents and
questions for the compressor / query reasoner) and `tokenize_for_generation` (the generator's chat prompt).

User text (documents, questions, answers) is always tokenized as text: `"<MEM0>"` or `"<|im_end|>"` written in a
document is a string of characters, never a control token. Only the prompt template's own text can hold them.

This file is copied to the Hub next to `modeling_clara.py` (remote code): it imports only transformers, jinja2 and
the standard library.
"""

import copy
import logging
import re
import string
from collections.abc import Sequence

import torch
from jinja2.exceptions import TemplateError
from transformers import ProcessorMixin

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Your task is to extract relevant information from provided documents "
    "and to answer to questions as briefly as possible."
)
DEFAULT_USER_PROMPT_TEMPLATE = "Background:\n{documents}\n\nQuestion:{question}"
ENCODER_TOKEN = "<ENC>"
SEPARATOR_TOKEN = "<SEP>"

# Stand-ins for the user's text while the chat template renders: the rendered string is cut at them, template text
# is tokenized with its control tokens, user text without.
_DOCUMENTS, _QUESTION, _ANSWER = "\x00clara-documents\x00", "\x00clara-question\x00", "\x00clara-answer\x00"
_SLOT = re.compile(f"({re.escape(_DOCUMENTS)}|{re.escape(_QUESTION)}|{re.escape(_ANSWER)})")


def memory_token(index: int) -> str:
    return f"<MEM{index}>"


class ClaraProcessor(ProcessorMixin):
    r"""
    Tokenizer, memory-token layout and prompt of a [`ClaraForRAG`]; saved and loaded with the model, and on its own
    with `AutoProcessor.from_pretrained(folder)`.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]):
            The base model's tokenizer with CLaRa's added tokens (see [`ClaraProcessor.from_base_tokenizer`]).
        doc_max_length (`int`, *optional*, defaults to 256):
            Documents and questions are truncated to this many tokens before compression.
        system_prompt (`str`, *optional*):
            The generator's system prompt (the reference prompt by default). Folded into the user turn for chat
            templates without a system role.
        user_prompt_template (`str`, *optional*):
            The generator's user turn; must contain `{documents}` (the memory blocks, or the raw text for the
            uncompressed baseline) and `{question}`.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from modeling_clara import ClaraProcessor
    >>> processor = ClaraProcessor.from_base_tokenizer(AutoTokenizer.from_pretrained("path/to/base"), num_memory_tokens=8)
    >>> batch = processor.tokenize_for_compression(["The Eiffel Tower is in Paris."])
    >>> batch["input_ids"].shape  # <ENC> + document + 8 memory tokens
    torch.Size([1, 17])
    ```
    """

    def __init__(
        self,
        tokenizer=None,
        doc_max_length: int = 256,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        user_prompt_template: str = DEFAULT_USER_PROMPT_TEMPLATE,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("ClaraProcessor needs a tokenizer (see ClaraProcessor.from_base_tokenizer).")
        if doc_max_length < 1:
            raise ValueError(f"doc_max_length must be >= 1, got {doc_max_length}.")
        try:
            placeholders = [
                name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                for _, name, spec, conversion in string.Formatter().parse(user_prompt_template)
                if name is not None
            ]
        except ValueError as error:  # a lone brace
            raise ValueError(f"user_prompt_template: {error}; write a literal brace as {{{{ or }}}}.") from None
        if sorted(placeholders) != ["documents", "question"]:
            raise ValueError(
                "user_prompt_template must hold the placeholders {documents} and {question} once each and no other "
                f"(a literal brace is written {{{{ or }}}}), got {placeholders}."
            )
        self.doc_max_length = doc_max_length
        self.system_prompt = system_prompt
        self.user_prompt_template = user_prompt_template
        super().__init__(tokenizer, **kwargs)
        if not tokenizer.chat_template:
            raise ValueError(
                "The tokenizer has no chat template: the generator's prompt is built with it. Set "
                "tokenizer.chat_template (a saved processor keeps it in chat_template.jinja)."
            )
        vocabulary = tokenizer.get_vocab()
        missing = [token for token in (memory_token(0), ENCODER_TOKEN, SEPARATOR_TOKEN) if token not in vocabulary]
        if missing:
            raise ValueError(
                f"The tokenizer lacks CLaRa's tokens {missing}: build the processor with "
                "ClaraProcessor.from_base_tokenizer(base_tokenizer, num_memory_tokens)."
            )
        count = 0
        while memory_token(count) in vocabulary:
            count += 1
        self.memory_token_ids = [vocabulary[memory_token(i)] for i in range(count)]
        self.encoder_token_id = vocabulary[ENCODER_TOKEN]
        self.separator_token_id = vocabulary[SEPARATOR_TOKEN]

    @classmethod
    def from_base_tokenizer(cls, tokenizer, num_memory_tokens: int, **kwargs) -> "ClaraProcessor":
        """A processor on a copy of a base tokenizer, with `<MEM0>..<MEM{n-1}>`, `<ENC>`, `<SEP>` appended (in this
        order, after the base vocabulary), left padding, and a pad token (BOS, else EOS) when the base has none."""
        if num_memory_tokens < 1:
            raise ValueError(f"num_memory_tokens must be >= 1, got {num_memory_tokens}.")
        tokenizer = copy.deepcopy(tokenizer)
        new_tokens = [memory_token(i) for i in range(num_memory_tokens)] + [ENCODER_TOKEN, SEPARATOR_TOKEN]
        already_there = [token for token in new_tokens if token in tokenizer.get_vocab()]
        if already_there:
            raise ValueError(f"The tokenizer already has CLaRa tokens {already_there[:3]}...: pass the base tokenizer.")
        tokenizer.add_special_tokens({"extra_special_tokens": new_tokens}, replace_extra_special_tokens=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.bos_token if tokenizer.bos_token is not None else tokenizer.eos_token
        tokenizer.padding_side = "left"
        return cls(tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "ClaraProcessor":
        processor = super().from_pretrained(*args, **kwargs)
        processor.tokenizer.padding_side = "left"  # not kept by every tokenizer's saved config
        return processor

    @property
    def num_memory_tokens(self) -> int:
        return len(self.memory_token_ids)

    @property
    def added_token_ids(self) -> list[int]:
        """Ids of every token CLaRa adds: the memory tokens, `<ENC>`, `<SEP>`."""
        return [*self.memory_token_ids, self.encoder_token_id, self.separator_token_id]

    def _text_ids(self, texts: list[str]) -> list[list[int]]:
        """User text as text: special-token strings inside it are split into ordinary tokens."""
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    # ------------------------------------------------------------------ compressor / query reasoner inputs

    def tokenize_for_compression(
        self, texts: Sequence[str], kind: str = "document", warn_truncation: bool = True
    ) -> dict[str, torch.Tensor]:
        """`<ENC> + text (truncated to doc_max_length tokens) + <MEM0>..<MEM{n-1}>`, left-padded.

        Used for documents (compressor) and questions (query reasoner) alike. Empty texts raise. The number of
        truncated texts is logged, or, with `warn_truncation=False` (training collators, which report it as a
        metric), returned under `"num_truncated"`.

        Returns:
            `{"input_ids", "attention_mask"}`, CPU tensors `[len(texts), L]`; the memory tokens are the last n_mem
            positions of every row.
        """
        check_texts(texts, kind)
        token_ids = self._text_ids(list(texts))
        truncated = sum(len(ids) > self.doc_max_length for ids in token_ids)
        if truncated and warn_truncation:
            logger.warning(
                "%d of %d %ss were longer than doc_max_length=%d tokens and were truncated.",
                truncated, len(texts), kind, self.doc_max_length,
            )
        sequences = [[self.encoder_token_id, *ids[: self.doc_max_length], *self.memory_token_ids] for ids in token_ids]
        batch = left_pad(sequences, self.tokenizer.pad_token_id)
        if not warn_truncation:
            batch["num_truncated"] = truncated
        return batch

    # ------------------------------------------------------------------ generator inputs

    def tokenize_for_generation(
        self,
        questions: Sequence[str],
        num_documents: int | Sequence[int] | None = None,
        answers: Sequence[str] | None = None,
        system_prompt: str | Sequence[str | None] | None = None,
        max_length: int | None = None,
        warn_truncation: bool = True,
        documents: Sequence[Sequence[str]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The generator's chat prompt per question, left-padded.

        The `{documents}` slot holds `num_documents` blocks `<MEM0>..<MEM{n-1}><SEP>` (one per compressed document
        the generator reads), or, with `documents` instead, the raw texts joined by blank lines (the uncompressed
        baseline). `questions` fill the `{question}` slot: a question, or in stage 1 an instruction.

        With `answers`, the assistant turn is appended and `labels` covers exactly its tokens (-100 elsewhere); a
        sequence longer than `max_length` loses the end of its answer (counted in a logged warning, or returned
        under `"num_truncated"` with `warn_truncation=False`). `system_prompt` (one, or one per question; None
        entries keep the processor's) replaces `self.system_prompt`.
        """
        check_texts(questions, "question")
        if (num_documents is None) == (documents is None):
            raise ValueError("Pass exactly one of num_documents (compressed documents) and documents (raw text).")
        if documents is not None:
            if len(documents) != len(questions) or (documents and isinstance(documents[0], str)):
                raise ValueError("documents must be one list of documents per question.")
            slots = [self._text_ids(["\n\n".join(texts)])[0] for texts in documents]
        else:
            counts = [num_documents] * len(questions) if isinstance(num_documents, int) else list(num_documents)
            if len(counts) != len(questions):
                raise ValueError(f"{len(questions)} questions but {len(counts)} document counts.")
            block = [*self.memory_token_ids, self.separator_token_id]
            slots = [block * count for count in counts]
        if answers is not None and len(answers) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers.")
        if system_prompt is None or isinstance(system_prompt, str):
            system_prompts = [system_prompt] * len(questions)
        else:
            system_prompts = list(system_prompt)
        if len(system_prompts) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(system_prompts)} system prompts.")

        truncated = 0
        sequences, label_sequences = [], []
        question_ids = self._text_ids(list(questions))
        answer_ids = self._text_ids(list(answers)) if answers is not None else [None] * len(questions)
        # The template is rendered and its own text tokenized once per distinct system prompt, not once per row.
        templates = {
            prompt: self._template(prompt, with_answer=answers is not None) for prompt in dict.fromkeys(system_prompts)
        }
        for i in range(len(questions)):
            texts = {_DOCUMENTS: slots[i], _QUESTION: question_ids[i], _ANSWER: answer_ids[i]}
            prompt, answer_part = templates[system_prompts[i]]
            prompt_ids = self._fill(prompt, texts)
            if answers is None:
                sequences.append(prompt_ids)
                continue
            full_ids = prompt_ids + self._fill(answer_part, texts)
            if max_length is not None and len(full_ids) > max_length:
                if len(prompt_ids) >= max_length:
                    raise ValueError(f"Question {i}: the prompt alone has {len(prompt_ids)} tokens, max_length={max_length}.")
                full_ids, truncated = full_ids[:max_length], truncated + 1
            sequences.append(full_ids)
            label_sequences.append([-100] * len(prompt_ids) + full_ids[len(prompt_ids) :])
        if truncated and warn_truncation:
            logger.warning("%d of %d answers were cut to fit max_length=%d tokens.", truncated, len(questions), max_length)
        batch = left_pad(sequences, self.tokenizer.pad_token_id)
        if not warn_truncation:
            batch["num_truncated"] = truncated
        if answers is not None:
            batch["labels"] = left_pad(label_sequences, -100)["input_ids"]
        return batch

    def _template(self, system_prompt: str | None, with_answer: bool) -> tuple[list, list]:
        """The chat template rendered around the slot stand-ins, cut at them, its own text tokenized with control
        tokens: `(prompt up to the assistant turn, the rest)`, each a list of token-id lists and slot stand-ins."""
        return tuple(
            [piece if _SLOT.fullmatch(piece) else self.tokenizer(piece, add_special_tokens=False)["input_ids"]
             for piece in _SLOT.split(rendered) if piece]
            for rendered in self._render(system_prompt, with_answer)
        )

    def _render(self, system_prompt: str | None, with_answer: bool) -> tuple[str, str]:
        """The chat template rendered around the slot stand-ins: `(prompt up to the assistant turn, the rest)`."""
        if not self.tokenizer.chat_template:
            raise ValueError("The tokenizer has no chat template; set tokenizer.chat_template for the generator.")
        system_prompt = self.system_prompt if system_prompt is None else system_prompt
        user = self.user_prompt_template.format(documents=_DOCUMENTS, question=_QUESTION)
        conversation = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
        try:
            prompt = self._apply_chat_template(conversation)
        except TemplateError:
            # Templates without a system role (Mistral-Instruct) get the system prompt at the top of the user turn.
            conversation = [{"role": "user", "content": f"{system_prompt}\n\n{user}"}]
            prompt = self._apply_chat_template(conversation)
        if not with_answer:
            return prompt, ""
        full = self._apply_chat_template([*conversation, {"role": "assistant", "content": _ANSWER}])
        if not full.startswith(prompt):
            raise ValueError("The chat template does not render the prompt as a prefix of prompt + answer.")
        return prompt, full[len(prompt) :]

    def _apply_chat_template(self, conversation: list[dict[str, str]]) -> str:
        ends_with_question = conversation[-1]["role"] == "user"
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=ends_with_question)

    @staticmethod
    def _fill(template: list, slot_ids: dict[str, list[int]]) -> list[int]:
        """Token ids of a template from `_template`: its own ids, and each slot's ids as given."""
        ids = []
        for piece in template:
            ids += slot_ids[piece] if isinstance(piece, str) else piece
        return ids

    def batch_decode(self, token_ids, **kwargs) -> list[str]:
        """Decoded and stripped generations (`skip_special_tokens=True` by default)."""
        kwargs.setdefault("skip_special_tokens", True)
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, **kwargs)]


def compressed_text(text: str, tokenizer, max_tokens: int) -> str:
    """The part of `text` the compressor reads: its first `max_tokens` tokens as `ClaraProcessor` tokenizes it (special
    tokens split), as text. A text RAG baseline given this reads exactly what CLaRa compresses."""
    def encode(part: str) -> dict:
        return tokenizer(part, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)

    offsets = encode(text)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    # A cut inside a character that byte-level BPE spells with several tokens keeps the whole character, which may
    # take more tokens than were cut: then cut a token earlier.
    for count in range(max_tokens, 0, -1):
        cut = text[: offsets[count - 1][1]].rstrip()
        if len(encode(cut)["input_ids"]) <= max_tokens:
            break
    return cut


def check_texts(texts: Sequence[str], kind: str) -> None:
    """Raises a `ValueError` naming the problem unless `texts` is a non-empty list of non-empty strings."""
    if isinstance(texts, str):
        raise ValueError(f"Expected a list of {kind}s, got a single string.")
    if len(texts) == 0:
        raise ValueError(f"Expected at least one {kind}, got an empty list.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{kind.capitalize()} {i} is a {type(text).__name__}, not a string.")
        if not text.strip():
            raise ValueError(f"{kind.capitalize()} {i} is empty.")


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, -len(sequence) :] = torch.tensor(sequence)
            attention_mask[row, -len(sequence) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


__all__ = ["ClaraProcessor", "DEFAULT_SYSTEM_PROMPT", "DEFAULT_USER_PROMPT_TEMPLATE", "compressed_text"]
