"""Training arguments shared by the three stage configs."""

from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import TrainingArguments

__all__ = ["CHECKPOINTING_ARGUMENT", "ClaraTrainingConfig", "TextDistillationConfig"]

# The `TrainingArguments` field that turns gradient checkpointing on: transformers 5.23 renamed it
# `activation_checkpointing` and warns at the old name, which older releases have alone.
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
    else "gradient_checkpointing"
)


@dataclass
class ClaraTrainingConfig(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] plus the data settings every CLaRa stage needs. The stage configs
    ([`SCPConfig`], [`InstructConfig`], [`JointConfig`]) set the reference defaults of their stage. The model and its
    settings are apart, in [`ClaraModelConfig`].

    > Data

    train_file (`str`), eval_file (`str`, *optional*): JSONL in the stage's reference format.
    skip_malformed_rows (`bool`, defaults to `False`): skip and count malformed rows instead of failing on the first.
    max_length (`int`, defaults to 2048): generator sequence length; longer answers are cut (and counted).

    > Attention

    cudnn_attention (`bool`, defaults to `False`): let `scaled_dot_product_attention` use cuDNN's kernel while
        training. Off by default: on H100/H200 GPUs, from torch 2.11 on, its backward returns NaN gradients for a
        masked sequence 64 tokens past a multiple of 128 (pytorch/pytorch#196678), such as a left-padded batch of
        448 tokens; the other kernels are used instead. Inference is not affected.

    > Defaults that differ from `TrainingArguments` (the reference settings, CLARA.md section 3)

    learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.03 (a ratio), adam_beta2=0.95,
    weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=2, gradient_accumulation_steps=16 (global batch
    128 on 4 devices), num_train_epochs=1, logging_steps=10, seed=42, remove_unused_columns=False (the collators need
    the raw rows), prediction_loss_only=True (evaluation keeps no logits).

    And logging_nan_inf_filter=False: the filter reads every step's loss on the host, which on a GPU makes the host
    wait for the step's forward and backward passes before it queues more work. `ClaraTrainer` stops on a non-finite
    loss or gradient norm at the next logging step instead.
    """

    train_file: str | None = field(default=None, metadata={"help": "Training JSONL in the stage's format."})
    eval_file: str | None = field(default=None, metadata={"help": "Evaluation JSONL in the stage's format."})
    skip_malformed_rows: bool = field(default=False, metadata={"help": "Skip and count malformed rows."})
    max_length: int = field(default=2048, metadata={"help": "Generator sequence length."})
    cudnn_attention: bool = field(
        default=False,
        metadata={"help": "Let attention use cuDNN's kernel in training (off: its backward returns NaN gradients on "
                  "H100/H200 for masked sequences of 64 mod 128 tokens, pytorch/pytorch#196678)."},
    )

    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 16
    num_train_epochs: float = 1.0
    logging_steps: float = 10
    seed: int = 42
    remove_unused_columns: bool = False
    prediction_loss_only: bool = True
    logging_nan_inf_filter: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}.")
        for name in ("train_file", "eval_file"):  # checked before a model is loaded
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name}: no data file at {path}.")


@dataclass
class TextDistillationConfig:
    r"""
    The option of the stages whose generator reads a row's own documents (1 and 2), mixed into their configs.

    > Distillation from the text

    distillation_weight (`float`, defaults to 0.0): adds `distillation_weight` x KL(text reader || generator) per
        answer token to the loss. The text reader is the bare base model (adapters off) reading the documents' raw
        text, cut to what the compressor reads, in the generator's prompt, as text RAG does: the generator reading
        the memories learns the text reader's whole next-token distribution over the answer, not only the answer's
        own token. Costs one forward pass of the base over the text prompts per step, without gradients. 0 turns
        it off.
    """

    distillation_weight: float = field(
        default=0.0, metadata={"help": "Weight of the KL from the bare base reading the text to the generator (0: off)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.distillation_weight >= 0:
            raise ValueError(f"distillation_weight must be >= 0, got {self.distillation_weight}.")
