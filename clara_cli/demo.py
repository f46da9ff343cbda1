"""`clara demo`: the main job on a fresh machine. A small real corpus is compressed into a memory bank; questions
are answered from it by CLaRa (query reasoner over the bank, generator from the top k memories) and, beside that, by
text RAG (BM25 over the same passages, the bare base model reading their text), with the retrieved passages, their
scores and the timings.

The corpus: the Python Language Reference excerpts shipped inside every CPython installation as
`pydoc_data.topics` (the text `help("assert")` prints; PSF license), one passage per topic: its title and the first
prose of its text, code and grammar blocks left out. Nothing is downloaded.
"""

import re
import tempfile
import time
from dataclasses import dataclass, field

import torch

__all__ = ["DEMO_QUESTIONS", "DemoArguments", "FirstTokenTimer", "python_reference_corpus", "run_demo"]

DEMO_QUESTIONS = [
    "What happens when a pass statement is executed?",
    "Which loop does a break statement terminate?",
    "What is the with statement used for?",
]
PASSAGE_WORDS = 150  # about the 256 tokens a document is compressed from


@dataclass
class DemoArguments:
    """What `clara demo` loads, compresses, asks and prints."""

    model: str = field(
        default="default",
        metadata={"help": "A ClaraForRAG folder, or 'default': the trained default on SmolLM2-135M-Instruct."},
    )
    questions: list[str] = field(default_factory=lambda: list(DEMO_QUESTIONS), metadata={"help": "Questions to ask."})
    k: int = field(default=2, metadata={"help": "Passages each answer reads (the top k of the ranking)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per answer at most."})
    bank: str | None = field(default=None, metadata={"help": "Keep the memory bank in this folder (default: a temporary one)."})
    seed: int = field(default=42, metadata={"help": "Seed of the untrained default's adapters (when no trained one is shipped)."})

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"--k {self.k}: the generator reads at least one passage.")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not self.questions or not all(question.strip() for question in self.questions):
            raise ValueError("--questions must hold at least one non-empty question.")


def python_reference_corpus() -> list[dict[str, str]]:
    """One passage per topic of `pydoc_data.topics`: `{"id": topic, "text": "<title>: <first prose>"}`."""
    from pydoc_data.topics import topics

    passages = []
    for name, text in topics.items():
        title, *lines = text.splitlines()
        prose = [
            line.strip()
            for line in lines
            if line.strip() and not line.startswith(" ") and not re.fullmatch(r"[*=\-^~]+", line.strip())
        ]
        words = " ".join(prose).split()[:PASSAGE_WORDS]
        if words:
            passages.append({"id": name, "text": f"{title.strip()}: {' '.join(words)}"})
    return passages


class FirstTokenTimer:
    """A logits processor that records when the first token is chosen (the end of the prompt's prefill); on a GPU
    it waits for the device first, so the time is the computation's."""

    def __init__(self):
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.first = time.perf_counter()
        return scores


def _timed_generation(generate, *args, **kwargs) -> tuple[list[str], float, float]:
    from transformers import LogitsProcessorList

    timer, started = FirstTokenTimer(), time.perf_counter()
    answers = generate(*args, logits_processor=LogitsProcessorList([timer]), **kwargs)
    return answers, timer.first - started, time.perf_counter() - started


def run_demo(args: DemoArguments) -> dict:
    """Runs the demo, printing as it goes; returns what it printed as data (for tests and scripts)."""
    from evaluation.harness import bm25_rank, load_model

    corpus = python_reference_corpus()
    started = time.perf_counter()
    model = load_model(args.model, args.seed)
    trained = model.config.training_stage is not None
    print(f"Loaded {'the default' if args.model == 'default' else args.model} in "
          f"{time.perf_counter() - started:.1f}s: {model.config.text_config.model_type}, "
          f"{model.config.num_memory_tokens} memory vectors per passage of up to {model.config.doc_max_length} tokens.")
    if not trained:
        print("NOTE: this model's adapters are UNTRAINED: its ranking and its answers "
              "from memories are meaningless. The text-RAG column shows what the base model does with the text.")
    print(f"Corpus: {len(corpus)} passages of the Python Language Reference (pydoc_data.topics, shipped with Python).")

    k = min(args.k, len(corpus))
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        model.merge_adapter("compressor")  # compression, then answers, run as fast as the bare base model's
        bank = model.compress_corpus(corpus, args.bank or scratch, batch_size=8, dtype="float32")
        compression_s = time.perf_counter() - started
        model.unmerge_adapter("compressor")
        model.merge_adapter("generator")
        print(f"Compressed the corpus into a memory bank {tuple(bank.memories.shape)} in {compression_s:.1f}s "
              f"({len(corpus) / compression_s:.1f} passages/s).\n")
        texts = [passage["text"] for passage in corpus]
        results = []
        for question in args.questions:
            started = time.perf_counter()
            scores, indices = bank.search(model.encode_queries([question]), k)
            clara_retrieval_s = time.perf_counter() - started
            selected = bank.memories[indices].to(device=model.device, dtype=model.dtype)
            (clara_answer,), clara_ttft, clara_total = _timed_generation(
                model.generate_from_compressed, [question], selected, max_new_tokens=args.max_new_tokens
            )
            started = time.perf_counter()
            bm25 = bm25_rank(question, texts)[:k]
            text_retrieval_s = time.perf_counter() - started
            (text_answer,), text_ttft, text_total = _timed_generation(
                model.generate_from_text, [question], [[texts[i] for i in bm25]], max_new_tokens=args.max_new_tokens
            )
            result = {
                "question": question,
                "clara": {"passages": [(bank.ids[i], round(s, 3)) for s, i in zip(scores[0].tolist(), indices[0].tolist())],
                          "answer": clara_answer, "retrieval_s": clara_retrieval_s, "ttft_s": clara_ttft, "total_s": clara_total},
                "text_rag": {"passages": [corpus[i]["id"] for i in bm25], "answer": text_answer,
                             "retrieval_s": text_retrieval_s, "ttft_s": text_ttft, "total_s": text_total},
            }
            results.append(result)
            _print_result(result)
    return {"compression_s": compression_s, "passages": len(corpus), "trained": trained, "results": results}


def _print_result(result: dict) -> None:
    clara, text = result["clara"], result["text_rag"]
    print(f"Q: {result['question']}")
    print(f"  CLaRa    retrieved {', '.join(f'{name} ({score:.3f})' for name, score in clara['passages'])}")
    print(f"           answer: {clara['answer']!r}")
    print(f"           retrieval {clara['retrieval_s'] * 1000:.0f} ms, first token {clara['ttft_s'] * 1000:.0f} ms, "
          f"answer {clara['total_s']:.2f} s")
    print(f"  text RAG retrieved (BM25) {', '.join(text['passages'])}")
    print(f"           answer: {text['answer']!r}")
    print(f"           retrieval {text['retrieval_s'] * 1000:.0f} ms, first token {text['ttft_s'] * 1000:.0f} ms, "
          f"answer {text['total_s']:.2f} s\n")
