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
    differentiable top-k, with no relevance labels. The compressor and the memory embeddings stay frozen.
    """

    stage = "joint"
    previous_stages = ("instruct", "scp")
    trainable_components = ("query_reasoner", "generator")

    def prepare_model(self, model: ClaraForRAG, args: JointConfig) -> None:
        # The forward's default k; the saved model then reads as many documents at inference as it was trained on.
        model.config.generation_top_k = args.top_k
        if args.query_reasoner_init == "compressor":
            model.copy_adapter("compressor", "query_reasoner")

    def build_collator(self, model: ClaraForRAG, args: JointConfig, datasets: list) -> JointCollator:
        bank = self.compress_all_documents(model, datasets) if args.precompute_document_embeddings else None
        return JointCollator(model, args.max_length, args.top_k, document_bank=bank)

    @staticmethod
    def compress_all_documents(model: ClaraForRAG, datasets: list) -> tuple[dict[str, int], torch.Tensor]:
        """Every distinct document of the datasets, compressed once by the frozen compressor (eval mode, no
        gradient): `(text -> row, [D, n_mem, hidden] on the CPU)`. Each process computes the whole bank."""
        documents = list(dict.fromkeys(doc for data in datasets if data is not None for row in data for doc in row["documents"]))
        was_training = model.training
        model.eval()
        try:
            bank = model.compress_documents(documents, show_progress_bar=True).cpu()
        finally:
            model.train(was_training)
        return {document: i for i, document in enumerate(documents)}, bank
