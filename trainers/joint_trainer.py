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
        if args.query_reasoner_init == "compressor":
            model.copy_adapter("compressor", "query_reasoner")

    def build_collator(self, model: ClaraForRAG, args: JointConfig) -> JointCollator:
        return JointCollator(model, args.max_length, args.top_k)
