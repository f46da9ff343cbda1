from modeling_clara import ClaraForRAG

from .clara_trainer import ClaraTrainer
from .collators import InstructCollator
from .instruct_config import InstructConfig

__all__ = ["InstructTrainer"]


class InstructTrainer(ClaraTrainer):
    """Stage 2 (compression instruction tuning) on rows `{"question", "docs", "answer" | "gold_answer"}`.

    Starts from a stage-1 checkpoint; the generator adapter starts anew unless `generator_init="keep"`. Trains
    `trainable_components`.

    Example:

    ```python
    >>> trainer = InstructTrainer(args=InstructConfig(output_dir="clara-instruct", train_file="instruct.jsonl"),
    ...                           model_args=ClaraModelConfig(model_name_or_path="clara-scp"))
    >>> trainer.train()
    ```
    """

    stage = "instruct"
    previous_stages = ("scp",)
    trainable_components = ("compressor", "generator", "added_token_embeddings")

    def prepare_model(self, model: ClaraForRAG, args: InstructConfig) -> None:
        if args.generator_init == "reinit":
            model.reset_adapter("generator")

    def build_collator(self, model: ClaraForRAG, args: InstructConfig, datasets: list | None) -> InstructCollator:
        return InstructCollator(model.processor, args.max_length, self.text_max_length(model, args))
