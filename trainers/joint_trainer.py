import torch

from modeling_clara import ClaraForRAG

from .clara_trainer import ClaraTrainer
from .collators import JointCollator
from .joint_config import JointConfig

__all__ = ["JointTrainer"]


class JointTrainer(ClaraTrainer):
    """Stage 3 (end-to-end) on rows `{"question", "docs", "answer" | "gold_answer", "pos_index"?}`.

    Starts from a stage-2 (or stage-1) checkpoint. The query reasoner starts as a copy of the compressor (unless
    `query_reasoner_init="keep"`); the query reasoner and the generator learn from the answer's CE alone through the
    differentiable top-k over `model.config.generation_top_k` candidates, with no relevance labels. The compressor
    and the added-token embeddings stay frozen. Rows with fewer candidates than the top-k are refused when the data
    is read.

    Example:

    ```python
    >>> trainer = JointTrainer(args=JointConfig(output_dir="clara-joint", train_file="joint.jsonl"),
    ...                        model_args=ClaraModelConfig(model_name_or_path="clara-instruct", generation_top_k=5))
    >>> trainer.train()
    ```
    """

    stage = "joint"
    previous_stages = ("instruct", "scp")
    trainable_components = ("query_reasoner", "generator")

    def prepare_model(self, model: ClaraForRAG, args: JointConfig) -> None:
        if args.query_reasoner_init == "compressor":
            model.copy_adapter("compressor", "query_reasoner")

    def load_data(self, path: str, model: ClaraForRAG, args: JointConfig, min_documents: int = 1):
        return super().load_data(path, model, args, min_documents=model.config.generation_top_k)

    def build_collator(self, model: ClaraForRAG, args: JointConfig, datasets: list | None) -> JointCollator:
        bank = self.compress_all_documents(model, datasets) if args.precompute_document_memories and datasets else None
        return JointCollator(model.processor, args.max_length, model.config.generation_top_k, document_bank=bank)

    @staticmethod
    def compress_all_documents(model: ClaraForRAG, datasets: list) -> tuple[dict[str, int], torch.Tensor]:
        """Every distinct document of the datasets, compressed once by the frozen compressor (eval mode, no
        gradient): `(text -> row, memories [D, n_mem, hidden] on the CPU)`. Each process computes the whole bank."""
        documents = list(dict.fromkeys(doc for data in datasets if data is not None for row in data for doc in row["documents"]))
        was_training = model.training
        model.eval()
        try:
            memories = model.compress_documents(documents, show_progress_bar=True).cpu()
        finally:
            model.train(was_training)
        return {document: i for i, document in enumerate(documents)}, memories
