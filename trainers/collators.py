"""Data collators: canonical rows (see `trainers.data`) -> `ClaraForRAG.forward` inputs, through the model's
`ClaraProcessor`."""

import torch

from modeling_clara.processing_clara import compressed_text

__all__ = [
    "SCP_QA_SYSTEM_PROMPT",
    "SCP_QA_INSTRUCTION",
    "PARAPHRASE_INSTRUCTION",
    "SCPCollator",
    "InstructCollator",
    "JointCollator",
]

SCP_QA_SYSTEM_PROMPT = (
    "You are a helpful assistant. Given a document, generate some single questions to cover all key information "
    "of the document and answer them."
)
SCP_QA_INSTRUCTION = "Generate questions that cover all key information of the document, and answer them."
# One instruction for every paraphrase (and reconstruction) row. It must not depend on the document: an
# instruction chosen from the document (the reference draws one of a dozen) tells the generator which document to
# write without reading the memories, a side channel measured at token F1 75.5 on memorised passages. A random draw
# would close it too, but would make runs depend on how rows are batched and resumed.
PARAPHRASE_INSTRUCTION = "Restate the document, keeping all of its information."


def _document_mask(documents_per_row: list[list[str]]) -> dict[str, torch.Tensor]:
    """`document_mask [B, N]` when rows hold different numbers of documents (the shorter rows padded to N); nothing
    when they hold the same, as the model then has no documents to leave out, and selecting the real ones by a mask
    counts them on the host (a GPU sync)."""
    counts = [len(documents) for documents in documents_per_row]
    if len(set(counts)) == 1:
        return {}
    return {"document_mask": torch.tensor([[i < count for i in range(max(counts))] for count in counts], dtype=torch.bool)}


def _document_tensors(processor, documents_per_row: list[list[str]]) -> dict[str, torch.Tensor]:
    """`[B, N, L]` document tokens, `_document_mask` (rows with fewer documents are padded with copies of their
    first document, masked out) and the fraction of the real documents that were truncated."""
    flat = processor.tokenize_for_compression(
        [document for documents in documents_per_row for document in documents], warn_truncation=False
    )
    num_documents = max(len(documents) for documents in documents_per_row)
    rows, start = [], 0
    for documents in documents_per_row:
        rows.append([start + i for i in range(len(documents))] + [start] * (num_documents - len(documents)))
        start += len(documents)
    index = torch.tensor(rows)
    return {
        "document_input_ids": flat["input_ids"][index],
        "document_attention_mask": flat["attention_mask"][index],
        **_document_mask(documents_per_row),
        "truncated_documents": torch.tensor(flat["num_truncated"] / len(flat["input_ids"])),
    }


def _logits_to_keep(labels: torch.Tensor) -> int:
    """How many last positions' logits the loss reads: from the one that predicts the batch's earliest labelled
    token on (0: all, when nothing is labelled). Computed here, on the host, so that the model's forward need not
    read the labels back from the device."""
    predicted = (labels[:, 1:] != -100).any(0)  # position i + 1's label, predicted by position i's logits
    return labels.shape[1] - int(predicted.int().argmax()) if predicted.any() else 0


class _GeneratorPrompts:
    """What the stage collators share: each builds its generator prompts in `prompt_fields`, from which both the
    batch and `check_rows`, the check run when the data is loaded, are made."""

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def prompt_fields(self, rows: list[dict]) -> dict:
        """`tokenize_for_generation` arguments of the rows' prompts (questions, num_documents, system_prompt)."""
        raise NotImplementedError

    def answers(self, rows: list[dict]) -> list[str]:
        return [row["answer"] for row in rows]

    def check_rows(self, rows: list[dict]) -> list[str | None]:
        """Per row, why it cannot be trained on (its prompt leaves no room for an answer in `max_length`), or None."""
        lengths = self.processor.tokenize_for_generation(**self.prompt_fields(rows))["attention_mask"].sum(-1)
        return [
            f"the generator prompt alone has {n} tokens, max_length={self.max_length} leaves no room for the answer"
            if n >= self.max_length else None
            for n in lengths.tolist()
        ]

    def generator_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor.tokenize_for_generation(
            **self.prompt_fields(rows), answers=self.answers(rows), max_length=self.max_length, warn_truncation=False
        )
        # Truncation counts travel in the batch (they survive dataloader workers) and are logged by the trainer.
        batch["truncated_answers"] = torch.tensor(batch.pop("num_truncated") / len(batch["input_ids"]))
        batch["logits_to_keep"] = _logits_to_keep(batch["labels"])
        return batch


class _OwnDocuments(_GeneratorPrompts):
    """Stages 1 and 2, whose generator reads each row's own documents (`documents`), all of them, compressed.

    With `text_max_length` (distillation from the text), each batch also holds the text reader's inputs,
    `text_input_ids`, `text_attention_mask` and `text_labels`: the same prompts and answers with the row's documents
    as raw text, cut to what the compressor reads, in place of their memories, and `text_logits_to_keep`, the text
    reader's answer positions. They are never cut to `max_length`, so the generator's answer tokens are the first
    of the text reader's; a row whose text sequence is longer than `text_max_length` (the base's context) is
    refused when read.
    """

    def __init__(self, processor, max_length: int, text_max_length: int | None = None):
        super().__init__(processor, max_length)
        self.text_max_length = text_max_length

    def documents(self, rows: list[dict]) -> list[list[str]]:
        raise NotImplementedError

    def check_rows(self, rows: list[dict]) -> list[str | None]:
        reasons = super().check_rows(rows)
        if self.text_max_length is None:
            return reasons
        text_lengths = self.text_batch(rows)["text_attention_mask"].sum(-1).tolist()
        return [
            reason or (
                f"its text prompt and answer (distillation from the text) have {n} tokens, more than the base model's "
                f"context ({self.text_max_length} positions)" if n > self.text_max_length else None
            )
            for reason, n in zip(reasons, text_lengths)
        ]

    def text_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The text reader's inputs (see the class docstring)."""
        fields = {name: value for name, value in self.prompt_fields(rows).items() if name != "num_documents"}
        tokenizer, doc_max_length = self.processor.tokenizer, self.processor.doc_max_length
        documents = [[compressed_text(text, tokenizer, doc_max_length) for text in texts] for texts in self.documents(rows)]
        batch = self.processor.tokenize_for_generation(**fields, documents=documents, answers=self.answers(rows))
        batch["logits_to_keep"] = _logits_to_keep(batch["labels"])
        return {f"text_{name}": value for name, value in batch.items()}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.generator_batch(rows)
        batch.update(_document_tensors(self.processor, self.documents(rows)))
        if self.text_max_length is not None:
            batch.update(self.text_batch(rows))
        return batch


class SCPCollator(_OwnDocuments):
    """Stage 1: the compressor reads the document; the generator, seeing only its memories, produces all its QA
    pairs ("Question: ...\\nAnswer: ..." lines) or its paraphrase, each under its instruction.

    Example: `SCPCollator(model.processor, max_length=2048)(rows)` -> `model(**batch)` inputs.
    """

    def prompt_fields(self, rows: list[dict]) -> dict:
        qa = [row["data_type"] == "qa" for row in rows]
        return {
            "questions": [SCP_QA_INSTRUCTION if is_qa else PARAPHRASE_INSTRUCTION for is_qa in qa],
            "num_documents": 1,
            "system_prompt": [SCP_QA_SYSTEM_PROMPT if is_qa else None for is_qa in qa],
        }

    def answers(self, rows: list[dict]) -> list[str]:
        return [
            "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(row["questions"], row["answers"]))
            if row["data_type"] == "qa" else row["answers"][0]
            for row in rows
        ]

    def documents(self, rows: list[dict]) -> list[list[str]]:
        return [[row["document"]] for row in rows]


class InstructCollator(_OwnDocuments):
    """Stage 2: the generator reads all of a question's documents (top-5 in the reference) and learns the answer.

    Example: `InstructCollator(model.processor, max_length=2048)(rows)` -> `model(**batch)` inputs.
    """

    def prompt_fields(self, rows: list[dict]) -> dict:
        return {"questions": [row["question"] for row in rows], "num_documents": [len(row["documents"]) for row in rows]}

    def documents(self, rows: list[dict]) -> list[list[str]]:
        return [row["documents"] for row in rows]


class JointCollator(_GeneratorPrompts):
    """Stage 3: the query reasoner scores the candidates, the generator reads the top k. `positive_mask [B, N]`
    (from `pos_index`) is for Recall@k / Precision@k only; the model never sees it.

    With `document_bank` (`(text -> row, memories [D, n_mem, hidden])`, see `JointTrainer.compress_all_documents`)
    the batch carries precomputed `document_memories` instead of document tokens.

    Example: `JointCollator(model.processor, max_length=1024, top_k=model.config.generation_top_k)(rows)`.
    """

    def __init__(
        self, processor, max_length: int, top_k: int, document_bank: tuple[dict[str, int], torch.Tensor] | None = None
    ):
        super().__init__(processor, max_length)
        self.top_k, self.document_bank = top_k, document_bank

    def prompt_fields(self, rows: list[dict]) -> dict:
        return {"questions": [row["question"] for row in rows], "num_documents": self.top_k}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        questions = [row["question"] for row in rows]
        batch = self.generator_batch(rows)
        if self.document_bank is None:
            batch.update(_document_tensors(self.processor, [row["documents"] for row in rows]))
        else:
            batch.update(self._bank_memories([row["documents"] for row in rows]))
        queries = self.processor.tokenize_for_compression(questions, "question", warn_truncation=False)
        batch["query_input_ids"], batch["query_attention_mask"] = queries["input_ids"], queries["attention_mask"]
        candidates = batch["document_input_ids" if self.document_bank is None else "document_memories"].shape[1]
        positive_mask = torch.zeros(len(rows), candidates, dtype=torch.bool)
        for i, row in enumerate(rows):
            positive_mask[i, row["positives"]] = True
        batch["positive_mask"] = positive_mask
        batch["truncated_questions"] = torch.tensor(queries["num_truncated"] / len(rows))
        return batch

    def _bank_memories(self, documents_per_row: list[list[str]]) -> dict[str, torch.Tensor]:
        index, memories = self.document_bank
        num_documents = max(len(documents) for documents in documents_per_row)
        rows = [[index[d] for d in documents] + [index[documents[0]]] * (num_documents - len(documents)) for documents in documents_per_row]
        return {"document_memories": memories[torch.tensor(rows)], **_document_mask(documents_per_row)}
