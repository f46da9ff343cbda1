from modeling_clara import ClaraForRAG

from .clara_trainer import ClaraTrainer
from .collators import InstructCollator
from .instruct_config import InstructConfig

__all__ = ["InstructTrainer"]


class InstructTrainer(ClaraTrainer):
    """Stage 2 (compression instruction tuning) on rows `{"question", "docs", "answer" | "gold_answer"}`.

    Starts from a stage-1 checkpoint; the generator is re-initialised unless `generator_init="keep"`. Trains the
    compressor, the generator and the memory-token embeddings.
    """

    stage = "instruct"
    previous_stages = ("scp",)
    trainable_components = ("compressor", "generator", "memory_embeddings")

    def prepare_model(self, model: ClaraForRAG, args: InstructConfig) -> None:
        if args.generator_init == "reinit":
            model.reset_adapter("generator")

    def build_collator(self, model: ClaraForRAG, args: InstructConfig, datasets: list) -> InstructCollator:
        return InstructCollator(model, args.max_length)
