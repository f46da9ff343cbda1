"""Trainers for CLaRa's three stages, TRL-style: a config (a `TrainingArguments` subclass with the stage's reference
defaults) and a `Trainer` subclass per stage."""

from .clara_config import CHECKPOINTING_ARGUMENT, ClaraTrainingConfig, TextDistillationConfig
from .clara_trainer import ClaraTrainer
from .collators import InstructCollator, JointCollator, SCPCollator
from .data import MalformedRowError, load_rows
from .instruct_config import InstructConfig
from .instruct_trainer import InstructTrainer
from .joint_config import JointConfig
from .joint_trainer import JointTrainer
from .model_config import ClaraModelConfig
from .scp_config import SCPConfig
from .scp_trainer import SCPTrainer

# Stage name (`ClaraConfig.training_stage`, set by each trainer) -> (config class, trainer class).
STAGE_CLASSES = {
    trainer.stage: (config, trainer)
    for config, trainer in ((SCPConfig, SCPTrainer), (InstructConfig, InstructTrainer), (JointConfig, JointTrainer))
}

__all__ = [
    "CHECKPOINTING_ARGUMENT",
    "ClaraModelConfig",
    "ClaraTrainer",
    "ClaraTrainingConfig",
    "InstructCollator",
    "InstructConfig",
    "InstructTrainer",
    "JointCollator",
    "JointConfig",
    "JointTrainer",
    "MalformedRowError",
    "SCPCollator",
    "SCPConfig",
    "SCPTrainer",
    "STAGE_CLASSES",
    "TextDistillationConfig",
    "load_rows",
]
