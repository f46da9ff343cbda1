from dataclasses import dataclass, field

from .clara_config import ClaraTrainingConfig, TextDistillationConfig

__all__ = ["SCPConfig"]


@dataclass
class SCPConfig(TextDistillationConfig, ClaraTrainingConfig):
    r"""
    Stage 1, salient compressor pretraining: compressor, generator and added-token embeddings learn to rebuild a
    document's QA pairs and paraphrases from its memories. Loss: CE + `mse_weight` * MSE (+ `distillation_weight` *
    KL, see [`TextDistillationConfig`]). The compression and LoRA settings of the model it builds are
    [`ClaraModelConfig`] fields.

    > Defaults that differ from [`ClaraTrainingConfig`]

    lr_scheduler_type="cosine_with_min_lr" with lr_scheduler_kwargs={"min_lr_rate": 0.1} (cosine down to 0.1 lr).

    Example:

    ```python
    >>> args = SCPConfig(output_dir="clara-scp", train_file="scp.jsonl", num_train_epochs=4)
    ```
    """

    lr_scheduler_type: str = "cosine_with_min_lr"
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1})
