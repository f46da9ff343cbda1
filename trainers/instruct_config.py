from dataclasses import dataclass, field

from .clara_config import ClaraTrainingConfig

__all__ = ["InstructConfig"]


@dataclass
class InstructConfig(ClaraTrainingConfig):
    r"""
    Stage 2, compression instruction tuning: from a stage-1 checkpoint, the compressor and the generator learn to
    answer a question from the memory vectors of its documents (top-5 in the reference). Loss: CE + MSE.

    > Stage options

    generator_init (`str`, defaults to `"reinit"`): `"reinit"` starts a new generator adapter, as the reference
        does; `"keep"` continues from the stage-1 generator.

    Defaults are those of [`ClaraTrainingConfig`] (lr 1e-4 cosine, global batch 128 / micro 2, max_length 2048).
    """

    generator_init: str = field(default="reinit", metadata={"help": "'reinit' or 'keep' the stage-1 generator."})

    def __post_init__(self):
        super().__post_init__()
        if self.generator_init not in ("reinit", "keep"):
            raise ValueError(f"generator_init must be 'reinit' or 'keep', got {self.generator_init!r}.")
