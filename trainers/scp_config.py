from dataclasses import dataclass, field

from .clara_config import ClaraTrainingConfig

__all__ = ["SCPConfig"]


@dataclass
class SCPConfig(ClaraTrainingConfig):
    r"""
    Stage 1, salient compressor pretraining: compressor, generator and memory-token embeddings learn to rebuild a
    document's QA pairs and paraphrases from its memory vectors. Loss: CE + `mse_weight` * MSE.

    > The new model (stage 1 builds it from the base LLM)

    compression_rate (`int`, defaults to 32), doc_max_length (`int`, defaults to 256): memory tokens per document =
        doc_max_length // compression_rate.
    lora_r (`int`, defaults to 16), lora_alpha (`int`, defaults to 32), lora_dropout (`float`, defaults to 0.1).

    > Defaults that differ from [`ClaraTrainingConfig`]

    lr_scheduler_type="cosine_with_min_lr" with lr_scheduler_kwargs={"min_lr_rate": 0.1} (cosine down to 0.1 lr).
    """

    compression_rate: int = field(default=32, metadata={"help": "Document tokens per memory token."})
    doc_max_length: int = field(default=256, metadata={"help": "Document length before compression."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the three adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})

    lr_scheduler_type: str = "cosine_with_min_lr"
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1})
