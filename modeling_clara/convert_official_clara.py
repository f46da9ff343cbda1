"""Converting a checkpoint of the reference release (apple/CLaRa-7B-Base, -Instruct, -E2E: one folder per compression
rate, `compression-16/`, `compression-128/`) into a `ClaraForRAG` folder. `clara convert-official SRC DST` runs it.

The reference layout (CLARA.md section 9): `config.json` (`model_type: "CLaRa"`, `decoder_model_name`, `compr_rate`,
`doc_max_length`, `lora_r`, `training_stage`, `different_mem_tokens`, ...), `adapters.pth` (`{adapter name: LoRA
state dict as transformers' get_adapter_state_dict returns it}`) and `decoder_first_last_layers.pth` (the base's
`embed_tokens` and `lm_head` after `<MEM..>`, `<AE>`, `<ENC>`, `<SEP>` were appended to the vocabulary). The `.pth`
files are read with `torch.load(weights_only=True)` only: tensors, never code.

Mapping: `encoder_adapter` -> compressor, `decoder_adapter` -> generator, `query_reasoner_adapter` -> query reasoner
(a checkpoint without one, stages 1 and 1_2, gets a copy of the compressor, as the reference starts stage 2); the
embedding rows of the memory tokens (one shared `<MEM>` row per memory token when `different_mem_tokens` is false),
`<ENC>` and `<SEP>` -> `added_token_embeddings`. `<AE>` and the new tokens' `lm_head` rows are not used by CLaRa's
inference and are dropped. Every LoRA matrix must map onto one of ours and every one of ours must be filled, or
the conversion fails naming them. Not part of the Hub remote code.
"""

import json
import logging
from pathlib import Path

import torch

from .base_models import load_base_model
from .modeling_clara import ClaraForRAG

__all__ = ["REFERENCE_ADAPTERS", "REFERENCE_STAGES", "convert_official_checkpoint"]

logger = logging.getLogger(__name__)

REFERENCE_ADAPTERS = {"encoder_adapter": "compressor", "decoder_adapter": "generator", "query_reasoner_adapter": "query_reasoner"}
REFERENCE_STAGES = {"stage1": "scp", "stage1_2": "instruct", "stage2": "joint"}


def convert_official_checkpoint(source: str | Path, destination: str | Path | None = None, base: str | None = None) -> ClaraForRAG:
    """Converts the reference checkpoint folder `source` and, with `destination`, saves it there (adapter-only, the
    base referenced by `base` or the checkpoint's `decoder_model_name`). Returns the converted model."""
    source = Path(source)
    config_path = source / "config.json"
    if not config_path.is_file():
        rates = sorted(p.name for p in source.glob("compression-*") if p.is_dir())
        hint = f"; it holds {rates}: pass one of them (e.g. {source / rates[0]})" if rates else ""
        raise FileNotFoundError(f"No reference checkpoint at {source} (no config.json){hint}.")
    reference = json.loads(config_path.read_text())
    if reference.get("model_type") != "CLaRa":
        raise ValueError(f"{source} is not a reference CLaRa checkpoint: model_type is {reference.get('model_type')!r}.")
    if not reference.get("lora", False):
        raise ValueError(f"{source} is not a LoRA checkpoint (lora: false): only the released LoRA layout converts.")
    for name in ("adapters.pth", "decoder_first_last_layers.pth"):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source} lacks {name}.")
    stage = reference.get("training_stage")
    if stage not in REFERENCE_STAGES:
        raise ValueError(f"Unknown reference training_stage {stage!r}; expected one of {sorted(REFERENCE_STAGES)}.")

    base_reference = base or reference["decoder_model_name"]
    base_model, base_tokenizer = load_base_model(base_reference)
    lora_r = reference["lora_r"]
    model = ClaraForRAG.from_base_model(
        base_model,
        base_tokenizer,
        compression_rate=reference["compr_rate"],
        doc_max_length=reference["doc_max_length"],
        lora_r=lora_r,
        lora_alpha=2 * lora_r,  # the reference's LoraConfig: alpha 2r, dropout 0.1, all linear layers
        lora_dropout=0.1,
        generation_top_k=reference.get("generation_top_k", 1),
        training_stage=REFERENCE_STAGES[stage],
    )
    if reference.get("max_new_tokens"):
        model.generation_config.max_new_tokens = reference["max_new_tokens"]
    vocabulary_size = len(base_tokenizer)
    embeddings = _load_tensors(source / "decoder_first_last_layers.pth")
    model.added_token_embeddings.weight.data.copy_(
        _added_token_rows(embeddings, model, reference, vocabulary_size, source)
    )
    adapters = _load_tensors(source / "adapters.pth")
    _load_adapters(model, adapters, source)
    if destination is not None:
        model.save_pretrained(destination)
        logger.info("Converted %s (%s) to %s.", source, stage, destination)
    return model


def _load_tensors(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path} could not be read as tensors only (weights_only=True): {error}") from None


def _added_token_rows(embeddings: dict, model: ClaraForRAG, reference: dict, vocabulary_size: int, source: Path) -> torch.Tensor:
    """`[n_mem + 2, hidden]`: the reference's rows of the memory tokens, `<ENC>` and `<SEP>`, after checking that
    its base rows are those of the base model (else it was trained on another base)."""
    names = [key for key in embeddings if key.endswith("embed_tokens.weight")]
    if len(names) != 1:
        raise ValueError(f"{source}/decoder_first_last_layers.pth has no single embed_tokens.weight (keys: {sorted(embeddings)}).")
    table = embeddings[names[0]]
    num_memory = model.config.num_memory_tokens
    distinct = reference.get("different_mem_tokens", False)
    # Appended after the base vocabulary, in this order: <MEM0>..<MEM{n-1}> (or one <MEM>), <AE>, <ENC>, <SEP>.
    first_after_memory = vocabulary_size + (num_memory if distinct else 1)
    encoder_row, separator_row = first_after_memory + 1, first_after_memory + 2
    if table.shape[0] <= separator_row or table.shape[1] != model.config.text_config.hidden_size:
        raise ValueError(
            f"{source}: embed_tokens is {tuple(table.shape)}, expected at least {separator_row + 1} rows of "
            f"{model.config.text_config.hidden_size} (base vocabulary {vocabulary_size} + the added tokens)."
        )
    base_rows = model.language_model.get_input_embeddings().weight.detach().cpu()
    if not torch.allclose(table[:vocabulary_size].float(), base_rows.to(table.dtype).float(), atol=1e-6, rtol=0):
        raise ValueError(f"{source} was trained on another base model than the one loaded: its base embedding rows differ.")
    memory_rows = table[vocabulary_size : vocabulary_size + num_memory] if distinct else table[vocabulary_size].expand(num_memory, -1)
    rows = torch.cat([memory_rows, table[encoder_row : encoder_row + 1], table[separator_row : separator_row + 1]])
    return rows.to(model.added_token_embeddings.weight.dtype)


def _load_adapters(model: ClaraForRAG, adapters: dict, source: Path) -> None:
    unknown = sorted(set(adapters) - REFERENCE_ADAPTERS.keys())
    if unknown:
        raise ValueError(f"{source}/adapters.pth holds adapters this conversion does not know: {unknown}.")
    if "encoder_adapter" not in adapters or "decoder_adapter" not in adapters:
        raise ValueError(f"{source}/adapters.pth lacks {sorted({'encoder_adapter', 'decoder_adapter'} - adapters.keys())}.")
    parameters = dict(model.named_parameters())
    for reference_name, component in REFERENCE_ADAPTERS.items():
        if reference_name not in adapters:
            continue
        adapter = model.adapter_names[component]
        expected = {name for name in parameters if f".{adapter}." in name}
        filled = set()
        for key, value in adapters[reference_name].items():
            target = _our_name(key, adapter)
            if target not in expected:
                raise ValueError(f"{source}: {reference_name} weight {key!r} has no counterpart ({target!r}) in this model.")
            if parameters[target].shape != value.shape:
                raise ValueError(f"{source}: {reference_name} weight {key!r} is {tuple(value.shape)}, ours {tuple(parameters[target].shape)}.")
            parameters[target].data.copy_(value.to(parameters[target].dtype))
            filled.add(target)
        if filled != expected:
            missing = sorted(expected - filled)
            raise ValueError(f"{source}: {reference_name} lacks {len(missing)} of our {component} weights, e.g. {missing[:2]}.")
    if "query_reasoner_adapter" not in adapters:
        logger.info("%s has no query reasoner (a stage-1 or stage-1_2 checkpoint): it starts as a copy of the compressor.", source)
        model.copy_adapter("compressor", "query_reasoner")


def _our_name(reference_key: str, adapter: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A.weight` -> `language_model.model.layers.0.self_attn.q_proj.lora_A.<adapter>.weight`."""
    for matrix in ("lora_A", "lora_B"):
        marker = f".{matrix}.weight"
        if reference_key.endswith(marker):
            return f"language_model.{reference_key[: -len(marker)]}.{matrix}.{adapter}.weight"
    return reference_key
