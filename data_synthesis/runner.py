"""Running the pipeline over a corpus: input reading, windows, sharding, resumable output and the statistics report.

Output files, for `--output out.jsonl`:
- `out.jsonl`: the SCP rows (reference format plus `passage_id` and `coverage`), appended as passages finish.
- `out.jsonl.done`: one line per finished passage with its statistics, written after its rows.
- `out.jsonl.meta.json`: prompt version and fingerprint, backend, settings, input fields, shard, and each run's
  start time and backend.
- `out.jsonl.stats.json`: the statistics report over every finished passage.

A restart drops the rows of passages without a `.done` line (and any half-written last line) and redoes only
those passages, so a run killed at any moment ends with each passage's rows exactly once. A restart must use the
settings of the first run (prompts, model, generation and pipeline settings, input fields, shard; only the server
URL and `passages_per_batch` may change): otherwise it is refused, naming what differs. A backend that stops
answering stops the run (`BackendUnavailableError`) with the passages finished so far kept and nothing unfinished
marked done.
"""

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from modeling_clara.jsonl import read_jsonl

from .backends import BackendUnavailableError, LLMBackend
from .pipeline import SynthesisConfig, synthesize_passages
from .prompts import PROMPT_VERSION, PROMPTS, SYSTEM, prompts_fingerprint

__all__ = ["read_passages", "split_into_windows", "run_synthesis", "shard_of"]

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "contents", "document", "passage", "docs")


def _passage_id(text: str) -> str:
    return "p-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _row_text(row: dict, text_field: str | None):
    names = [text_field] if text_field else [name for name in TEXT_FIELDS if name in row]
    value = row.get(names[0]) if names else None
    if isinstance(value, list):  # SCP-format rows keep their passage in docs[0]
        value = value[0] if value else None
    return value


def read_passages(source, text_field: str | None = None, id_field: str = "id", counts: Counter | None = None):
    """Yields `{"id", "text"}` from a JSONL file, a `.txt` file or a folder of them (passages separated by blank
    lines), a folder saved with `datasets.save_to_disk`, or any iterable of dicts (e.g. a `datasets.Dataset`).
    Malformed or empty inputs are skipped and counted in `counts`."""
    counts = counts if counts is not None else Counter()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir() and (path / "dataset_info.json").exists():
            from datasets import load_from_disk

            yield from read_passages(load_from_disk(str(path)), text_field, id_field, counts)
            return
        if path.is_dir():
            for file in sorted(path.glob("*.txt")):
                yield from read_passages(file, text_field, id_field, counts)
            return
        if not path.is_file():
            raise FileNotFoundError(f"No input at {path}.")
        if path.suffix == ".txt":
            for index, block in enumerate(_read_text(path).split("\n\n")):
                if not block.strip():
                    counts["empty_passage"] += 1
                    continue
                yield {"id": f"{path.name}:{index}", "text": " ".join(block.split())}
            return
        for line_number, row, problem in read_jsonl(path):
            if problem:
                counts["malformed_input_line"] += 1
                logger.warning("%s:%d is %s; skipped.", path, line_number, problem)
                continue
            yield from _passage_from_row(row, text_field, id_field, counts, f"{path}:{line_number}")
        return
    for index, row in enumerate(source):
        yield from _passage_from_row(row, text_field, id_field, counts, f"row {index}")


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a leading byte-order mark dropped); a byte that is not UTF-8 raises, naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[error.start]:02x}); convert the file to UTF-8.") from None


def _passage_from_row(row, text_field, id_field, counts, where):
    text = _row_text(row, text_field) if isinstance(row, dict) else None
    if not isinstance(text, str):
        counts["malformed_input_line"] += 1
        logger.warning("%s has no text field (%s); skipped.", where, text_field or " / ".join(TEXT_FIELDS))
        return
    if not text.strip():
        counts["empty_passage"] += 1
        return
    text = " ".join(text.split())
    passage_id = row.get(id_field)
    yield {"id": str(passage_id) if passage_id not in (None, "") else _passage_id(text), "text": text}


def split_into_windows(passage: dict, window_words: int, overlap: int) -> list[dict]:
    """Passages longer than `window_words` words become overlapping windows with ids `ID#wK`."""
    words = passage["text"].split()
    if len(words) <= window_words:
        return [passage]
    step = window_words - overlap
    starts = range(0, max(len(words) - overlap, 1), step)
    return [{"id": f"{passage['id']}#w{k}", "text": " ".join(words[s : s + window_words])} for k, s in enumerate(starts)]


def shard_of(passage_id: str, num_shards: int) -> int:
    """A stable shard for a passage, independent of input order and machine."""
    return int(hashlib.sha1(passage_id.encode("utf-8")).hexdigest(), 16) % num_shards


def _read_complete_lines(path: Path) -> tuple[list[str], str]:
    """`(complete lines, whole text)` of a file; a half-written last line (left by a crash mid-write) is dropped."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = text.split("\n")
    if lines[-1].strip():
        logger.warning("Dropping a half-written last line of %s.", path)
    return [line for line in lines[:-1] if line.strip()], text


def _append(handle, lines: list[str]) -> None:
    handle.write("".join(line + "\n" for line in lines))
    handle.flush()
    os.fsync(handle.fileno())


def run_synthesis(
    source,
    output: str | Path,
    backend: LLMBackend,
    config: SynthesisConfig | None = None,
    shard: tuple[int, int] = (0, 1),
    text_field: str | None = None,
    id_field: str = "id",
    show_progress: bool = True,
) -> dict:
    """Synthesizes SCP rows for every passage of `source` in this shard and returns the statistics report."""
    config = config or SynthesisConfig()
    shard_index, num_shards = shard
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"Shard {shard_index}/{num_shards} does not exist: use i/n with 0 <= i < n.")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done_path, meta_path, stats_path = (Path(f"{output}{suffix}") for suffix in (".done", ".meta.json", ".stats.json"))
    meta = {
        "prompt_version": PROMPT_VERSION,
        "prompt_fingerprint": prompts_fingerprint(),
        "prompts": {"system": SYSTEM, **PROMPTS},
        "backend": backend.describe(),
        "settings": asdict(config),
        "input": {"text_field": text_field, "id_field": id_field},
        "shard": f"{shard_index}/{num_shards}",
    }
    run = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "backend": meta["backend"]}
    runs = [run]
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        differences = _differences(previous, meta)
        if differences:
            raise ValueError(
                f"{output} was started with other settings than this run's: {'; '.join(differences)}. Resume with "
                "the first run's settings (see its .meta.json), or use a new output file."
            )
        runs = previous.get("runs", []) + runs
    summaries = [json.loads(line) for line in _read_complete_lines(done_path)[0]]
    finished = {summary["passage_id"] for summary in summaries}

    input_counts = Counter()
    pending, seen, texts = [], set(finished), {}
    for passage in read_passages(source, text_field, id_field, input_counts):
        input_counts["passages"] += 1
        windows = split_into_windows(passage, config.window_words, config.window_overlap)
        input_counts["split_into_windows"] += len(windows) > 1
        for window in windows:
            window_id, digest = window["id"], hashlib.sha1(window["text"].encode("utf-8")).digest()
            if texts.setdefault(window_id, digest) != digest:
                raise ValueError(
                    f"Two different passages of {source} have the id {window_id!r}: ids must be unique (fix the "
                    f"input, or pass another id field; without one, ids are made from the text)."
                )
            if shard_of(window_id, num_shards) != shard_index:
                input_counts["other_shard"] += 1
            elif window_id in seen:
                input_counts["already_done" if window_id in finished else "duplicate_passage"] += 1
            else:
                seen.add(window_id)
                pending.append(window)
    if not input_counts["passages"]:
        raise ValueError(f"No passages in {source} ({dict(input_counts) or 'nothing read'}): nothing to synthesize.")
    skipped = {reason: input_counts[reason] for reason in ("malformed_input_line", "empty_passage", "duplicate_passage")}
    if any(skipped.values()):
        logger.warning("Input lines skipped: %s.", ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n))
    logger.info("%d passage(s) to synthesize, %d already done.", len(pending), len(finished))

    # The input is good: record this run, then recover (only passages with a .done line are finished; drop any
    # other rows).
    meta_path.write_text(json.dumps({**meta, "runs": runs}, indent=2))
    rows, rows_text = _read_complete_lines(output)
    kept_text = "".join(line + "\n" for line in rows if json.loads(line)["passage_id"] in finished)
    if rows_text != kept_text:
        logger.warning("Dropping rows of unfinished passages from %s; they are redone.", output)
        output.write_text(kept_text, encoding="utf-8")
    done_path.write_text("".join(json.dumps(s) + "\n" for s in summaries), encoding="utf-8")

    done_this_run = 0
    with output.open("a", encoding="utf-8") as rows_file, done_path.open("a", encoding="utf-8") as done_file:
        progress = tqdm(total=len(pending), unit="passage", desc="Synthesizing", disable=not show_progress)
        try:
            for start in range(0, len(pending), config.passages_per_batch):
                for result in synthesize_passages(pending[start : start + config.passages_per_batch], backend, config):
                    _append(rows_file, [json.dumps(row, ensure_ascii=False) for row in result.rows()])
                    _append(done_file, [json.dumps(result.summary())])
                    summaries.append(result.summary())
                    done_this_run += 1
                    progress.update(1)
        except BackendUnavailableError as error:
            stats_path.write_text(json.dumps(_report(summaries, input_counts), indent=2))
            raise BackendUnavailableError(
                f"{error} The run stopped: {done_this_run} passage(s) were finished and saved in this run, "
                f"{len(pending) - done_this_run} are left; rerun the same command to resume."
            ) from error
        finally:
            progress.close()

    report = _report(summaries, input_counts)
    stats_path.write_text(json.dumps(report, indent=2))
    return report


# Settings a resumed run may change: they do not change what is written.
RESUMABLE_CHANGES = {"backend.url", "settings.passages_per_batch"}


def _differences(previous: dict, current: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every setting of `current` (nested keys joined by dots) that `previous` records
    otherwise, except `RESUMABLE_CHANGES`; the prompts are compared by their fingerprint."""
    differences = []
    for key, value in current.items():
        name = f"{prefix}{key}"
        if name in RESUMABLE_CHANGES or name in ("prompts", "prompt_version"):
            continue
        old = previous.get(key, "(not recorded)")
        if isinstance(value, dict) and isinstance(old, dict):
            differences += _differences(old, value, f"{name}.")
        elif old != value:
            differences.append(f"{name}: {old!r} -> {value!r}")
    return differences


def _report(summaries: list[dict], input_counts: Counter) -> dict:
    qa_counts = [s["qa"] for s in summaries]
    coverages = [s["coverage"] for s in summaries if s["coverage"] is not None]
    rejections = Counter()
    for summary in summaries:
        rejections.update(summary["rejections"])
    return {
        "prompt_version": PROMPT_VERSION,
        "passages": len(summaries),
        "passages_without_rows": sum(1 for s in summaries if not s["qa"] and not s["paraphrases"]),
        "qa_rows": sum(1 for n in qa_counts if n),
        "paraphrase_rows": sum(s["paraphrases"] for s in summaries),
        "qa_per_passage": {
            "mean": sum(qa_counts) / max(len(qa_counts), 1),
            "min": min(qa_counts, default=0),
            "max": max(qa_counts, default=0),
        },
        "coverage": {
            "mean": sum(coverages) / len(coverages) if coverages else None,
            "complete": sum(1 for c in coverages if c == 1.0),
            "unknown": len(summaries) - len(coverages),
        },
        "rounds_used": dict(sorted(Counter(s["rounds"] for s in summaries).items())),
        "rejections": dict(rejections.most_common()),
        "input": dict(input_counts),
    }
