"""`benchmarks/reproduce.py` end to end on a tiny model and fictional passages: every phase runs and reports."""

import importlib.util
import json
from pathlib import Path

import pytest

from testing_utils import FICTIONAL_FACTS, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scp_file(path):
    rows = []
    for country, capital, colour in FICTIONAL_FACTS:
        rows.append({
            "data_type": "qa",
            "question": [f"What is the capital of {country}?", f"What colour is the flag of {country}?"],
            "answers": [capital, colour],
            "docs": [f"{country} is a country. Its capital is {capital}. Its flag is {colour}."],
        })
    return write_jsonl(path, rows)


def test_the_study_runs_every_phase_and_writes_its_report(reproduce, tiny_base_dir, tmp_path):
    settings = {
        "data": scp_file(tmp_path / "scp.jsonl"), "base": tiny_base_dir, "output_dir": tmp_path / "run",
        "docs_dir": tmp_path / "docs", "export_dir": tmp_path / "export", "doc_max_length": 16, "held_out": 3,
        "negatives": 2, "scp_epochs": 1, "instruct_epochs": 1, "batch_size": 4, "max_new_tokens": 3,
        "reconstruction_tokens": 4, "eval_batch_size": 4, "max_length": 512,
    }
    arguments = [f"--{key}={value}" for key, value in settings.items()] + ["--rates", "4", "8"]
    assert reproduce.main(arguments) == 0  # the command line, as a user runs it
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"] == {"train_passages": 5, "held_out_passages": 3, "scp_rows": 10, "instruct_rows": 10,
                               "eval_questions": 6}
    expected = {"closed-book", "text RAG"} | {f"cr{r} {s}" for r in (4, 8) for s in ("untrained", "stage 1", "stage 2")}
    assert set(results["answers"]) == expected
    assert set(results["reconstruction"]) == {"cr4 stage 1", "cr8 stage 1"}
    assert {"random", "bm25"} <= set(results["retrieval"]["baselines"])
    assert "cr8 stage-2 compressor as query reasoner" in results["retrieval"]
    assert results["training"]["cr4 stage 1"]["steps"] == 3 and not results["skipped"]
    stats = results["memories"]["cr4 untrained"]
    assert stats["memory_rms"] > 0 and -1 <= stats["mean_pairwise_cosine"] <= 1
    report = (tmp_path / "docs" / "reproduction.md").read_text()
    assert "| cr8 stage 2 |" in report and "Recall@1" in report
    exported = sorted(path.name for path in (tmp_path / "export").iterdir())
    assert exported == ["added_token_embeddings.safetensors", "clara.json", "compressor.safetensors",
                        "generator.safetensors"]


def test_a_spent_time_budget_skips_the_remaining_phases(reproduce, tiny_base_dir, tmp_path):
    config = reproduce.StudyConfig(
        data=scp_file(tmp_path / "scp.jsonl"), base=tiny_base_dir, output_dir=str(tmp_path / "run"),
        docs_dir=str(tmp_path / "docs"), rates=[4], doc_max_length=16, held_out=3, negatives=2, time_budget_s=0,
    )
    results = reproduce.Study(config).run()
    assert results["skipped"] == ["rate 4: untrained"] and results["answers"] == {}
