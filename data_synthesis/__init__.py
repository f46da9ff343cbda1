"""Key-preserving SCP data synthesis: QA, complex QA and paraphrases per passage with a verification loop, over a
local transformers model or an OpenAI-compatible endpoint. `clara synthesize` runs it from the command line."""

from .backends import (
    BackendConfig,
    BackendUnavailableError,
    GenerationRequest,
    HFBackend,
    LLMBackend,
    OpenAIBackend,
    backend_from_config,
)
from .parsing import ParseError, parse_json, parse_qa_pairs
from .pipeline import PassageResult, SynthesisConfig, synthesize_passages
from .prompts import PROMPT_VERSION
from .runner import read_passages, run_synthesis, shard_of, split_into_windows

__all__ = [
    "BackendConfig",
    "BackendUnavailableError",
    "GenerationRequest",
    "HFBackend",
    "LLMBackend",
    "OpenAIBackend",
    "PROMPT_VERSION",
    "ParseError",
    "PassageResult",
    "SynthesisConfig",
    "backend_from_config",
    "parse_json",
    "parse_qa_pairs",
    "read_passages",
    "run_synthesis",
    "shard_of",
    "split_into_windows",
    "synthesize_passages",
]
