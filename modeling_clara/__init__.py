"""CLaRa model package: `ClaraConfig` and `ClaraForRAG`, registered with the Auto classes.

Importing the package registers `model_type="clara"` with `AutoConfig`/`AutoModel`, and marks both classes
for `auto_map`, so a saved model also loads with `trust_remote_code=True` where this package is absent.
"""

from transformers import AutoConfig, AutoModel

from .configuration_clara import ClaraConfig
from .modeling_clara import ClaraForRAG, ClaraOutput, ClaraPreTrainedModel, cosine_scores, differentiable_topk

AutoConfig.register("clara", ClaraConfig, exist_ok=True)
AutoModel.register(ClaraConfig, ClaraForRAG, exist_ok=True)
ClaraConfig.register_for_auto_class()
ClaraForRAG.register_for_auto_class("AutoModel")

__all__ = [
    "ClaraConfig",
    "ClaraForRAG",
    "ClaraOutput",
    "ClaraPreTrainedModel",
    "cosine_scores",
    "differentiable_topk",
]
