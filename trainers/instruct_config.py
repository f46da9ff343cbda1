from dataclasses import dataclass, field
from typing import Literal, get_args

from .clara_config import ClaraTrainingConfig, TextDistillationConfig

__all__ = ["InstructConfig"]

GeneratorInit = Literal["reinit", "keep"]


@dataclass
class InstructConfig(TextDistillationConfig, ClaraTrainingConfig):
    r"""
    Stage 2, compression instruction tuning: from a stage-1 checkpoint, the compressor and the generator learn to
    answer a question from the memories of its documents (top-5 in the reference). Loss: CE + MSE (+
    `distillation_weight` * KL, see [`TextDistillationConfig`]).

    > Stage options

    generator_init (`str`, defaults to `"reinit"`): `"reinit"` starts a new generator adapter, as the reference
        does; `"keep"` continues from the stage-1 generator.

    Defaults are those of [`ClaraTrainingConfig`] (lr 1e-4 cosine, global batch 128 / micro 2, max_length 2048).

    Example:

    ```python
    >>> args = InstructConfig(output_dir="clara-instruct", train_file="instruct.jsonl", generator_init="keep")
    ```
    """

    generator_init: GeneratorInit = field(default="reinit", metadata={"help": "'reinit' or 'keep' the stage-1 generator."})

    def __post_init__(self):
        super().__post_init__()
        if self.generator_init not in get_args(GeneratorInit):
            raise ValueError(f"generator_init must be one of {get_args(GeneratorInit)}, got {self.generator_init!r}.")
