"""Memory banks: a corpus compressed once into sharded safetensors, resumable, searched exactly or with FAISS, refused
to another model, and `clara compress` / `clara ask` over it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clara_cli.main import main
from modeling_clara import MemoryBank, cosine_scores
from testing_utils import DOCUMENTS, FICTIONAL_FACTS, randomize_adapters, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [f"{country} is a country. Its capital is {capital}. Its flag is {colour}." for country, capital, colour in FICTIONAL_FACTS]
CORPUS += DOCUMENTS


def corpus_rows():
    return [{"id": f"doc-{i}", "text": text} for i, text in enumerate(CORPUS)]


def test_a_bank_holds_the_models_memories_in_shards(clara, tmp_path, caplog):
    rows = corpus_rows()
    rows.insert(3, {"id": "empty", "text": "  "})
    with caplog.at_level("WARNING"):
        bank = clara.compress_corpus(rows, tmp_path / "bank", batch_size=2, shard_size=5, dtype="float32", show_progress=False)
    assert "Skipped 1 empty document" in caplog.text
    assert len(bank) == len(CORPUS) and bank.ids == [row["id"] for row in rows if row["id"] != "empty"]
    assert bank.texts == CORPUS
    assert sorted(p.name for p in (tmp_path / "bank").glob("*.safetensors")) == [f"shard-r000-0000{i}.safetensors" for i in range(3)]
    torch.testing.assert_close(bank.memories, clara.compress_documents(CORPUS), atol=1e-6, rtol=1e-5)
    loaded = MemoryBank.load(tmp_path / "bank")
    assert torch.equal(loaded.memories, bank.memories) and loaded.ids == bank.ids
    manifest = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert manifest["complete"] and manifest["num_documents"] == len(CORPUS) and manifest["dtype"] == "float32"
    bf16 = clara.compress_corpus(CORPUS, tmp_path / "bf16", show_progress=False)
    assert bf16.memories.dtype == torch.bfloat16 and bf16.ids == [str(i) for i in range(len(CORPUS))]


def test_search_is_exact_and_faiss_agrees(clara, tmp_path, monkeypatch):
    bank = clara.compress_corpus(CORPUS, tmp_path / "bank", dtype="float32", show_progress=False)
    queries = clara.encode_queries(["What is the capital of Zorland?", "Who won two Nobel prizes?"])
    expected = cosine_scores(queries, bank.memories).topk(3, dim=-1)
    monkeypatch.setattr("modeling_clara.memory_bank.SEARCH_CHUNK", 4)  # several chunks, merged
    scores, indices = bank.search(queries, k=3)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores, expected.values, atol=1e-5, rtol=0)
    bank.build_index()
    assert (tmp_path / "bank" / "index.faiss").is_file()
    faiss_scores, faiss_indices = MemoryBank.load(tmp_path / "bank").search(queries, k=3)  # the index, by default
    assert torch.equal(faiss_indices, expected.indices)
    torch.testing.assert_close(faiss_scores, expected.values, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="k=0"):
        bank.search(queries, k=0)


class Crash(RuntimeError):
    pass


def crashing(rows, after):
    for position, row in enumerate(rows):
        if position == after:
            raise Crash("killed")
        yield row


def test_a_crashed_compression_resumes_without_duplicates(clara, tmp_path):
    complete = clara.compress_corpus(corpus_rows(), tmp_path / "complete", shard_size=3, dtype="float32", show_progress=False)
    folder = tmp_path / "resumed"
    with pytest.raises(Crash):
        clara.compress_corpus(crashing(corpus_rows(), after=7), folder, shard_size=3, dtype="float32", show_progress=False)
    assert len(list(folder.glob("*.safetensors"))) == 2  # documents 0-5; 6 was in an unwritten shard
    (folder / "shard-r000-00002.jsonl").write_text('{"index": 6, "id": "half"')  # a crash mid-write
    with pytest.raises(ValueError, match="incomplete"):
        MemoryBank.load(folder)
    resumed = clara.compress_corpus(corpus_rows(), folder, shard_size=3, dtype="float32", show_progress=False)
    assert resumed.ids == complete.ids and torch.equal(resumed.memories, complete.memories)


def test_a_bank_of_another_model_is_refused(clara, tmp_path):
    bank = clara.compress_corpus(CORPUS, tmp_path / "bank", show_progress=False)
    other = randomize_adapters(clara, seed=7)
    with pytest.raises(ValueError, match="made by another model"):
        other.answer_from_bank(["Where?"], bank)
    with pytest.raises(ValueError, match="model_fingerprint"):
        other.compress_corpus(CORPUS, tmp_path / "bank", show_progress=False)
    with pytest.raises(ValueError, match="dtype"):
        other.compress_corpus(CORPUS, tmp_path / "bank", dtype="float32", show_progress=False)


def test_answering_from_a_bank_is_search_then_generation(clara, tmp_path):
    bank = clara.compress_corpus(CORPUS, tmp_path / "bank", dtype="float32", show_progress=False)
    questions = ["What is the capital of Zorland?", "Where is the Eiffel Tower?"]
    answers, scores, indices = clara.answer_from_bank(questions, bank, k=2, max_new_tokens=4)
    expected_scores, expected_indices = bank.search(clara.encode_queries(questions), 2)
    assert torch.equal(indices, expected_indices)
    assert answers == clara.generate_from_compressed(questions, bank.memories[expected_indices], max_new_tokens=4)


def test_clara_compress_and_ask(clara, tmp_path, capsys):
    clara.save_pretrained(tmp_path / "model")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [*corpus_rows(), "{broken"])
    assert main(["compress", "--model", str(tmp_path / "model"), "--corpus", corpus, "--out", str(tmp_path / "bank"),
                 "--index", "--shard_size", "4"]) == 0
    assert f"{len(CORPUS)} documents" in capsys.readouterr().out
    assert main(["ask", "--model", str(tmp_path / "model"), "--bank", str(tmp_path / "bank"),
                 "--question", "What is the capital of Zorland?", "--k", "2", "--max_new_tokens", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["documents"]) == 2 and printed["documents"][0]["rank"] == 1
    assert printed["documents"][0]["id"].startswith("doc-") and isinstance(printed["answer"], str)
    assert main(["ask", "--model", str(tmp_path / "model"), "--bank", str(tmp_path / "bank"), "--question", "Zorland?"]) == 0
    assert "Retrieved (12 documents in the bank)" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_split_the_corpus_into_the_same_bank(clara, tmp_path):
    clara.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS) + "\n")
    arguments = ["compress", "--model", str(tmp_path / "model"), "--corpus", str(corpus), "--shard_size", "2",
                 "--dtype", "float32", "--use_cpu", "true"]
    assert main([*arguments, "--out", str(tmp_path / "single")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "hub_configs" / "accelerate" / "ddp.yaml")]
    subprocess.run(
        [*launch, "-m", "clara_cli.main", *arguments, "--out", str(tmp_path / "double")],
        check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    single, double = MemoryBank.load(tmp_path / "single"), MemoryBank.load(tmp_path / "double")
    assert {p.name[:10] for p in (tmp_path / "double").glob("*.safetensors")} == {"shard-r000", "shard-r001"}
    assert double.ids == single.ids and len(double) == len(CORPUS)
    torch.testing.assert_close(double.memories, single.memories, atol=1e-6, rtol=1e-5)
