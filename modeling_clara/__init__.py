"""CLaRa model package: `ClaraConfig`, `ClaraProcessor` and `ClaraForRAG`, registered with the Auto classes.

Importing the package registers `model_type="clara"` with `AutoConfig`/`AutoModel`/`AutoProcessor`, and marks the
classes for `auto_map`, so a saved model also loads with `trust_remote_code=True` where this package is absent.
`base_models` loads the base LLMs a CLaRa is built on (and an adapter-only checkpoint's base).
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .base_models import EMBEDDED_BASE_MODEL, load_base_model, load_base_tokenizer
from .configuration_clara import TRAINING_STAGES, ClaraConfig, TrainingStage
from .memory_bank import MemoryBank
from .modeling_clara import ClaraForRAG, ClaraOutput, ClaraPreTrainedModel, cosine_scores, differentiable_topk
from .processing_clara import ClaraProcessor, compressed_text

AutoConfig.register("clara", ClaraConfig, exist_ok=True)
AutoModel.register(ClaraConfig, ClaraForRAG, exist_ok=True)
AutoProcessor.register(ClaraConfig, ClaraProcessor, exist_ok=True)
ClaraConfig.register_for_auto_class()
ClaraForRAG.register_for_auto_class("AutoModel")
ClaraProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "EMBEDDED_BASE_MODEL",
    "TRAINING_STAGES",
    "ClaraConfig",
    "ClaraForRAG",
    "ClaraOutput",
    "ClaraPreTrainedModel",
    "ClaraProcessor",
    "MemoryBank",
    "TrainingStage",
    "compressed_text",
    "cosine_scores",
    "differentiable_topk",
    "load_base_model",
    "load_base_tokenizer",
]
