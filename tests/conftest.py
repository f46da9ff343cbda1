"""Fixtures: the tiny models and tokenizer are built once per session; each test gets a copy."""

import copy
import importlib.util
import os
from pathlib import Path

import pytest

from modeling_clara import ClaraForRAG
from testing_utils import build_base, build_tokenizer, randomize_adapters

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def _clara_models(tokenizer):
    built = {}
    for kind in ("llama", "mistral"):
        base = build_base(kind, len(tokenizer))
        model = ClaraForRAG.from_base_model(base, tokenizer, doc_max_length=16, compression_rate=4, generation_top_k=2)
        built[kind] = randomize_adapters(model)
    return built


@pytest.fixture(params=["llama", "mistral"])
def clara(request, _clara_models):
    """A tiny ClaraForRAG (tied-embedding Llama and untied Mistral) with random adapters, in eval mode."""
    return copy.deepcopy(_clara_models[request.param])


@pytest.fixture
def llama_clara(_clara_models):
    return copy.deepcopy(_clara_models["llama"])


@pytest.fixture(scope="session")
def tiny_base_dir(tokenizer, tmp_path_factory):
    """A tiny Llama and the test tokenizer saved as a base-model folder."""
    directory = tmp_path_factory.mktemp("tiny_base")
    build_base("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def reproduce():
    """`benchmarks/reproduce.py` (the study) as a module: benchmarks are scripts, not a package."""
    spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
