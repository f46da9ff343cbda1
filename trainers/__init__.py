"""Trainers for CLaRa's three stages, TRL-style: a config (a `TrainingArguments` subclass with the stage's reference
defaults) and a `Trainer` subclass per stage."""

from .clara_config import ClaraTrainingConfig
from .clara_trainer import ClaraTrainer
from .collators import InstructCollator, JointCollator, SCPCollator
from .data import MalformedRowError, load_rows
from .instruct_config import InstructConfig
from .instruct_trainer import InstructTrainer
from .joint_config import JointConfig
from .joint_trainer import JointTrainer
from .scp_config import SCPConfig
from .scp_trainer import SCPTrainer

STAGE_CLASSES = {
    "scp": (SCPConfig, SCPTrainer),
    "instruct": (InstructConfig, InstructTrainer),
    "joint": (JointConfig, JointTrainer),
}

__all__ = [
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
    "load_rows",
]
