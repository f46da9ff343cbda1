from dataclasses import dataclass, field
from typing import Literal, get_args

from .clara_config import ClaraTrainingConfig

__all__ = ["JointConfig"]

QueryReasonerInit = Literal["compressor", "keep"]


@dataclass
class JointConfig(ClaraTrainingConfig):
    r"""
    Stage 3, end-to-end training: from a stage-2 checkpoint, the query reasoner and the generator learn from the
    answer's CE alone, through the differentiable top-k over the model's `generation_top_k` (a
    [`ClaraModelConfig`] field); the compressor is frozen. Recall@k and Precision@k against `pos_index` are logged
    where rows have it.

    > Stage options

    query_reasoner_init (`str`, defaults to `"compressor"`): start the query reasoner as a copy of the compressor
        (the reference), or `"keep"` it.
    precompute_document_memories (`bool`, defaults to `False`): compress every document of the data once before
        training instead of in every step (same values: the frozen compressor runs without dropout either way).

    > Defaults that differ from [`ClaraTrainingConfig`]

    learning_rate=5e-6, lr_scheduler_type="constant_with_warmup", gradient_accumulation_steps=4 (global batch 32 on
    4 devices), max_length=1024.

    Example:

    ```python
    >>> args = JointConfig(output_dir="clara-joint", train_file="joint.jsonl", precompute_document_memories=True)
    ```
    """

    query_reasoner_init: QueryReasonerInit = field(default="compressor", metadata={"help": "'compressor' or 'keep'."})
    precompute_document_memories: bool = field(default=False, metadata={"help": "Compress all documents once."})

    learning_rate: float = 5e-6
    lr_scheduler_type: str = "constant_with_warmup"
    gradient_accumulation_steps: int = 4
    max_length: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.query_reasoner_init not in get_args(QueryReasonerInit):
            raise ValueError(
                f"query_reasoner_init must be one of {get_args(QueryReasonerInit)}, got {self.query_reasoner_init!r}."
            )
