"""Data collators: canonical rows (see `trainers.data`) -> `ClaraForRAG.forward` inputs, through the model's
`ClaraProcessor`."""

import torch

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


def _document_tensors(processor, documents_per_row: list[list[str]]) -> dict[str, torch.Tensor]:
    """`[B, N, L]` document tokens, `document_mask [B, N]` (rows with fewer documents are padded with copies of
    their first document, masked out) and the fraction of the real documents that were truncated."""
    flat = processor.tokenize_for_compression(
        [document for documents in documents_per_row for document in documents], warn_truncation=False
    )
    num_documents = max(len(documents) for documents in documents_per_row)
    rows, start = [], 0
    for documents in documents_per_row:
        rows.append([start + i for i in range(len(documents))] + [start] * (num_documents - len(documents)))
        start += len(documents)
    index = torch.tensor(rows)
    document_mask = torch.tensor(
        [[i < len(documents) for i in range(num_documents)] for documents in documents_per_row], dtype=torch.bool
    )
    return {
        "document_input_ids": flat["input_ids"][index],
        "document_attention_mask": flat["attention_mask"][index],
        "document_mask": document_mask,
        "truncated_documents": torch.tensor(flat["num_truncated"] / len(flat["input_ids"])),
    }


def _truncation_as_metric(batch: dict) -> dict:
    """Truncation counts travel in the batch (they survive dataloader workers) and are logged by the trainer."""
    batch["truncated_answers"] = torch.tensor(batch.pop("num_truncated") / len(batch["input_ids"]))
    return batch


class SCPCollator:
    """Stage 1: the compressor reads the document; the generator, seeing only its memories, produces all its QA
    pairs ("Question: ...\\nAnswer: ..." lines) or its paraphrase, each under its instruction.

    Example: `SCPCollator(model.processor, max_length=2048)(rows)` -> `model(**batch)` inputs.
    """

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        instructions, targets, system_prompts = [], [], []
        for row in rows:
            if row["data_type"] == "qa":
                instructions.append(SCP_QA_INSTRUCTION)
                targets.append("\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(row["questions"], row["answers"])))
                system_prompts.append(SCP_QA_SYSTEM_PROMPT)
            else:
                instructions.append(PARAPHRASE_INSTRUCTION)
                targets.append(row["answers"][0])
                system_prompts.append(None)
        batch = self.processor.tokenize_for_generation(
            instructions, 1, answers=targets, system_prompt=system_prompts, max_length=self.max_length,
            warn_truncation=False,
        )
        batch.update(_document_tensors(self.processor, [[row["document"]] for row in rows]))
        return _truncation_as_metric(batch)


class InstructCollator:
    """Stage 2: the generator reads all of a question's documents (top-5 in the reference) and learns the answer.

    Example: `InstructCollator(model.processor, max_length=2048)(rows)` -> `model(**batch)` inputs.
    """

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor.tokenize_for_generation(
            [row["question"] for row in rows],
            [len(row["documents"]) for row in rows],
            answers=[row["answer"] for row in rows],
            max_length=self.max_length,
            warn_truncation=False,
        )
        batch.update(_document_tensors(self.processor, [row["documents"] for row in rows]))
        return _truncation_as_metric(batch)


class JointCollator:
    """Stage 3: the query reasoner scores the candidates, the generator reads the top k. `positive_mask [B, N]`
    (from `pos_index`) is for Recall@k / Precision@k only; the model never sees it.

    With `document_bank` (`(text -> row, memories [D, n_mem, hidden])`, see `JointTrainer.compress_all_documents`)
    the batch carries precomputed `document_memories` instead of document tokens.

    Example: `JointCollator(model.processor, max_length=1024, top_k=model.config.generation_top_k)(rows)`.
    """

    def __init__(
        self, processor, max_length: int, top_k: int, document_bank: tuple[dict[str, int], torch.Tensor] | None = None
    ):
        self.processor, self.max_length, self.top_k, self.document_bank = processor, max_length, top_k, document_bank

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        questions = [row["question"] for row in rows]
        batch = self.processor.tokenize_for_generation(
            questions, self.top_k, answers=[row["answer"] for row in rows], max_length=self.max_length,
            warn_truncation=False,
        )
        if self.document_bank is None:
            batch.update(_document_tensors(self.processor, [row["documents"] for row in rows]))
        else:
            batch.update(self._bank_memories([row["documents"] for row in rows]))
        queries = self.processor.tokenize_for_compression(questions, "question", warn_truncation=False)
        batch["query_input_ids"], batch["query_attention_mask"] = queries["input_ids"], queries["attention_mask"]
        positive_mask = torch.zeros_like(batch["document_mask"])
        for i, row in enumerate(rows):
            positive_mask[i, row["positives"]] = True
        batch["positive_mask"] = positive_mask
        batch["truncated_questions"] = torch.tensor(queries["num_truncated"] / len(rows))
        return _truncation_as_metric(batch)

    def _bank_memories(self, documents_per_row: list[list[str]]) -> dict[str, torch.Tensor]:
        index, memories = self.document_bank
        num_documents = max(len(documents) for documents in documents_per_row)
        rows = [[index[d] for d in documents] + [index[documents[0]]] * (num_documents - len(documents)) for documents in documents_per_row]
        document_mask = torch.tensor(
            [[i < len(documents) for i in range(num_documents)] for documents in documents_per_row], dtype=torch.bool
        )
        return {"document_memories": memories[torch.tensor(rows)], "document_mask": document_mask}
