"""Memory banks: a corpus compressed once, then searched and answered from without compressing it again.

A bank is a folder:
- `bank.json`: the format, the model that made it (its path and a fingerprint of its compressor adapter,
  added-token embeddings and memory layout), the memory shape and dtype, and, once complete, its shards and size;
- `shard-rRRR-KKKKK.safetensors` (`memories [n, n_mem, hidden]`) with `shard-rRRR-KKKKK.jsonl` (per document its
  corpus position, id and text), written by process RRR; a shard counts once its safetensors file exists (written
  last, by rename), so a crashed run resumes after its last complete shard without duplicates;
- `index.faiss` (optional): a FAISS inner-product index over the normalised memories, for large banks.

Compression streams: memory use is one shard, whatever the corpus size. Under several processes (`accelerate
launch`, torch.distributed initialised) document i goes to process i % world_size.

This file is shipped with the Hub remote code: it imports torch, safetensors, tqdm and the standard library (faiss
only when an index is built or used).
"""

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

__all__ = ["MemoryBank", "compress_corpus", "model_fingerprint"]

logger = logging.getLogger(__name__)

BANK_FORMAT = 1
MANIFEST = "bank.json"
INDEX_FILE = "index.faiss"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SEARCH_CHUNK = 65536  # documents scored at once in exact search: bounds the score matrix


def model_fingerprint(model) -> str:
    """What a document's memories depend on: the memory layout, the compressor adapter and the added-token
    embeddings (SHA-256, 16 hex digits). The query reasoner and generator may change (stage 3) without changing it."""
    config = model.config
    digest = hashlib.sha256(
        json.dumps([config.compression_rate, config.doc_max_length, list(config.memory_token_ids)]).encode()
    )
    compressor = f".{config.compressor_adapter}."
    for name, tensor in sorted(model.own_state_dict().items()):
        if compressor in name or name.startswith("added_token_embeddings"):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _process_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def compress_corpus(
    model,
    documents: Iterable[dict | str],
    output: str | Path,
    batch_size: int = 32,
    shard_size: int = 4096,
    dtype: str = "bfloat16",
    show_progress: bool = True,
) -> "MemoryBank":
    """Compresses `documents` (`{"id", "text"}` dicts, or strings: their position is their id) into a bank at
    `output`, resuming a crashed run of the same model there; returns the complete bank (every process's shards).

    Empty documents are skipped, counted and logged. A folder holding a bank of another model, memory layout or
    dtype is refused.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1.")
    output = Path(output)
    rank, world_size = _process_rank()
    manifest = {
        "format": BANK_FORMAT,
        "model": model.name_or_path or None,
        "model_fingerprint": model_fingerprint(model),
        "compression_rate": model.config.compression_rate,
        "num_memory_tokens": model.config.num_memory_tokens,
        "hidden_size": model.config.text_config.hidden_size,
        "dtype": dtype,
    }
    if (output / MANIFEST).is_file():
        previous = json.loads((output / MANIFEST).read_text())
        differences = [key for key, value in manifest.items() if key != "model" and previous.get(key) != value]
        if differences:
            raise ValueError(
                f"{output} holds a memory bank with other {differences} (e.g. made by another model): use a new folder."
            )
    _barrier()  # every process has read the old manifest before it is rewritten
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / MANIFEST).write_text(json.dumps({**manifest, "complete": False}, indent=2))
    _barrier()

    done = _complete_shards(output, rank)
    resume_after = max((_last_index(output / f"{name}.jsonl") for name in done), default=-1)
    if done:
        logger.info("Resuming after corpus position %d (%d complete shard(s) of this process).", resume_after, len(done))
    for leftover in output.glob(f"shard-r{rank:03d}-*"):
        if leftover.name.removesuffix(".jsonl").removesuffix(".safetensors") not in done:
            leftover.unlink()  # half-written by a crash

    show = show_progress and rank == 0
    progress = tqdm(desc="Documents compressed", unit="doc", disable=not show)  # per shard; batches below
    entries, skipped = [], 0
    shard_number = len(done)
    was_training = model.training
    model.eval()
    try:
        for position, document in enumerate(documents):
            if position % world_size != rank or position <= resume_after:
                continue
            entry = {"index": position, **(_document(document, position))}
            if not entry["text"].strip():
                skipped += 1
                continue
            entries.append(entry)
            if len(entries) == shard_size:
                _write_shard(output, rank, shard_number, entries, batch_size, model, dtype, show)
                progress.update(len(entries))
                shard_number, entries = shard_number + 1, []
        if entries:
            _write_shard(output, rank, shard_number, entries, batch_size, model, dtype, show)
            progress.update(len(entries))
    finally:
        model.train(was_training)
        progress.close()
    if skipped:
        logger.warning("Skipped %d empty document(s).", skipped)
    _barrier()
    if rank == 0:
        shards = sorted(
            path.name.removesuffix(".safetensors") for path in output.glob("shard-r*-*.safetensors")
        )
        count = sum(_count_lines(output / f"{name}.jsonl") for name in shards)
        (output / MANIFEST).write_text(
            json.dumps({**manifest, "complete": True, "num_documents": count, "shards": shards}, indent=2)
        )
    _barrier()
    return MemoryBank.load(output)


def _document(document: dict | str, position: int) -> dict:
    if isinstance(document, str):
        return {"id": str(position), "text": document}
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        raise ValueError(f"Document {position} must be a string or a dict with a 'text' string, got {document!r:.80}.")
    return {"id": str(document.get("id", position)), "text": document["text"]}


def _write_shard(output: Path, rank: int, number: int, entries: list[dict], batch_size: int, model, dtype: str, show: bool) -> None:
    # A whole shard at a time: compress_documents batches it by length.
    memories = model.compress_documents([entry["text"] for entry in entries], batch_size, show_progress_bar=show)
    name = f"shard-r{rank:03d}-{number:05d}"
    with (output / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
    temporary = output / f"{name}.safetensors.tmp"
    save_file({"memories": memories.to("cpu", DTYPES[dtype]).contiguous()}, temporary)
    os.replace(temporary, output / f"{name}.safetensors")  # the shard is complete from here on


def _complete_shards(output: Path, rank: int) -> list[str]:
    return sorted(
        path.name.removesuffix(".safetensors")
        for path in output.glob(f"shard-r{rank:03d}-*.safetensors")
        if (output / path.name.replace(".safetensors", ".jsonl")).is_file()
    )


def _last_index(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        return max(json.loads(line)["index"] for line in handle)


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


class MemoryBank:
    r"""
    A compressed corpus: `memories [N, n_mem, hidden]`, and per document its `ids` and `texts` (corpus order).

    Example:

    ```python
    >>> bank = model.compress_corpus(["The Eiffel Tower is in Paris.", ...], "my-bank")
    >>> bank = MemoryBank.load("my-bank")
    >>> scores, indices = bank.search(model.encode_queries(["Where is the Eiffel Tower?"]), k=5)
    >>> model.answer_from_bank(["Where is the Eiffel Tower?"], bank, k=5)
    ```
    """

    def __init__(self, folder: Path, manifest: dict, memories: torch.Tensor, ids: list[str], texts: list[str]):
        self.folder, self.manifest, self.memories, self.ids, self.texts = folder, manifest, memories, ids, texts
        self._index = None

    @classmethod
    def load(cls, folder: str | Path) -> "MemoryBank":
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"No memory bank at {folder} (no {MANIFEST}).")
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != BANK_FORMAT:
            raise ValueError(f"{folder} is a bank of format {manifest.get('format')}; this version reads {BANK_FORMAT}.")
        if not manifest.get("complete"):
            raise ValueError(f"The memory bank at {folder} is incomplete: rerun the compression to finish it.")
        entries, memories = [], []
        for name in manifest["shards"]:
            with (folder / f"{name}.jsonl").open(encoding="utf-8") as handle:
                entries += [json.loads(line) for line in handle]
            memories.append(load_file(folder / f"{name}.safetensors")["memories"])
        if not entries:
            raise ValueError(f"The memory bank at {folder} holds no documents.")
        order = sorted(range(len(entries)), key=lambda i: entries[i]["index"])  # shards of several processes
        stacked = torch.cat(memories)[torch.tensor(order)]
        return cls(folder, manifest, stacked, [entries[i]["id"] for i in order], [entries[i]["text"] for i in order])

    def __len__(self) -> int:
        return len(self.ids)

    def check_model(self, model) -> None:
        """Refuses a model whose documents' memories would differ from the bank's (another compressor or layout)."""
        fingerprint = model_fingerprint(model)
        if fingerprint != self.manifest["model_fingerprint"]:
            raise ValueError(
                f"The memory bank at {self.folder} was made by another model ({self.manifest.get('model')}, fingerprint "
                f"{self.manifest['model_fingerprint']}); this model's compressor is {fingerprint}. Compress the corpus "
                "with this model."
            )

    def search(self, query_memories: torch.Tensor, k: int, use_index: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(scores [Q, k], indices [Q, k])`, best first, by cosine of flattened memories: exact in torch (in chunks),
        or with the FAISS index (`build_index`; used by default when the bank has one)."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the bank's {len(self)} documents.")
        if query_memories.dim() != 3 or query_memories.shape[1:] != self.memories.shape[1:]:
            raise ValueError(f"query memories must be [Q, {', '.join(map(str, self.memories.shape[1:]))}], got {tuple(query_memories.shape)}.")
        queries = F.normalize(query_memories.detach().float().cpu().flatten(1), dim=-1)
        if use_index or (use_index is None and (self.folder / INDEX_FILE).is_file()):
            scores, indices = self._faiss_index().search(queries.numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(indices)
        best_scores, best_indices = None, None
        for start in range(0, len(self), SEARCH_CHUNK):
            chunk = F.normalize(self.memories[start : start + SEARCH_CHUNK].float().flatten(1), dim=-1)
            scores = queries @ chunk.T
            top = scores.topk(min(k, scores.shape[1]), dim=-1)
            candidates = (top.values, top.indices + start)
            if best_scores is not None:
                candidates = (torch.cat([best_scores, candidates[0]], 1), torch.cat([best_indices, candidates[1]], 1))
            merged = candidates[0].topk(min(k, candidates[0].shape[1]), dim=-1)
            best_scores, best_indices = merged.values, candidates[1].gather(1, merged.indices)
        return best_scores, best_indices

    def build_index(self) -> None:
        """Builds and saves a FAISS inner-product index of the normalised memories (`pip install faiss-cpu`)."""
        faiss = _import_faiss()
        vectors = F.normalize(self.memories.float().flatten(1), dim=-1).numpy()
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        faiss.write_index(index, str(self.folder / INDEX_FILE))
        self._index = index

    def _faiss_index(self):
        if self._index is None:
            if not (self.folder / INDEX_FILE).is_file():
                raise FileNotFoundError(f"The memory bank at {self.folder} has no FAISS index: build it with build_index().")
            self._index = _import_faiss().read_index(str(self.folder / INDEX_FILE))
        return self._index


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("A FAISS index needs faiss: pip install faiss-cpu.") from None
    return faiss
