import json
import logging

import pytest

from testing_utils import REFERENCE_SCP_SAMPLE, instruct_rows, requires_reference_sample, scp_rows, write_jsonl
from trainers import MalformedRowError, load_rows


@requires_reference_sample
def test_the_reference_scp_sample_loads():
    dataset = load_rows(REFERENCE_SCP_SAMPLE, "scp")
    assert len(dataset) == 1000
    first = json.loads(REFERENCE_SCP_SAMPLE.open().readline())
    assert dataset[0] == {
        "data_type": "qa",
        "questions": first["question"],
        "answers": first["answers"],
        "document": first["docs"][0],
    }


def test_canonical_rows_for_each_stage(tmp_path):
    scp = load_rows(write_jsonl(tmp_path / "scp.jsonl", scp_rows()), "scp")
    assert scp[1]["data_type"] == "paraphrase" and scp[1]["questions"] == []
    instruct = load_rows(write_jsonl(tmp_path / "instruct.jsonl", instruct_rows()), "instruct")
    assert instruct[0]["answer"] == "Quvi" and len(instruct[0]["documents"]) == 2
    joint_rows = [{**row, "pos_index": [0]} for row in instruct_rows()]
    joint_rows[1] = {k: v for k, v in joint_rows[1].items() if k not in ("answer", "pos_index")}
    joint_rows[1]["gold_answer"] = ["Osk", "Osk City"]
    joint = load_rows(write_jsonl(tmp_path / "joint.jsonl", joint_rows), "joint")
    assert joint[0]["positives"] == [0]
    assert joint[1]["answer"] == "Osk" and joint[1]["positives"] == []


@pytest.mark.parametrize(
    "stage, bad_row, message",
    [
        ("scp", "{not json", "invalid JSON"),
        ("scp", "[1, 2]", "must be a JSON object"),
        ("scp", {"data_type": "summary", "answers": ["a"], "docs": ["d"]}, "'data_type'"),
        ("scp", {"data_type": "qa", "question": ["q1", "q2"], "answers": ["a"], "docs": ["d"]}, "2 questions but 1"),
        ("scp", {"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": ["d", "e"]}, "one document"),
        ("scp", {"data_type": "paraphrase", "answers": [""], "docs": ["d"]}, "answers\\[0\\]"),
        ("scp", {"data_type": "paraphrase", "answers": ["p1", "p2"], "docs": ["d"]}, "one answer .* got 2"),
        ("instruct", {"question": "q", "docs": ["d"]}, "'answer' or 'gold_answer'"),
        ("instruct", {"question": "q", "docs": [], "answer": "a"}, "'docs'"),
        ("joint", {"question": "q", "docs": ["d"], "answer": "a", "pos_index": [3]}, "'pos_index'"),
        ("instruct", {"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": ["d"]}, "'question'"),
    ],
)
def test_malformed_rows_name_the_file_and_line(tmp_path, stage, bad_row, message):
    good = scp_rows()[0] if stage == "scp" else {**instruct_rows()[0], "pos_index": [0]}
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad_row, good])
    with pytest.raises(MalformedRowError, match=f"data.jsonl:2: .*{message}"):
        load_rows(path, stage)


def test_malformed_rows_can_be_skipped_and_counted(tmp_path, caplog):
    rows = [scp_rows()[0], "{broken", {"data_type": "qa"}, "", scp_rows()[1], "{broken again"]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        dataset = load_rows(path, "scp", skip_malformed=True)
    assert len(dataset) == 2
    assert "Skipped 3 malformed row(s)" in caplog.text
    assert "2 x invalid JSON" in caplog.text


def test_a_byte_order_mark_keeps_row_1_and_a_bad_byte_names_its_line(tmp_path, caplog):
    rows = [json.dumps(row).encode() for row in scp_rows()[:3]]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + rows[0] + b"\n" + rows[1].replace(b"capital", b"capit\xe9l", 1) + b"\n" + rows[2] + b"\n")
    with pytest.raises(MalformedRowError, match="data.jsonl:2: not valid UTF-8 \\(byte 0xe9"):
        load_rows(path, "scp")
    with caplog.at_level(logging.WARNING):
        loaded = load_rows(path, "scp", skip_malformed=True)
    assert [row["document"] for row in loaded] == [scp_rows()[0]["docs"][0], scp_rows()[2]["docs"][0]]
    assert "1 x not valid UTF-8" in caplog.text


def test_empty_or_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "absent.jsonl", "scp")
    with pytest.raises(ValueError, match="no usable scp rows"):
        load_rows(write_jsonl(tmp_path / "empty.jsonl", []), "scp")
    with pytest.raises(ValueError, match="Unknown data format"):
        load_rows(write_jsonl(tmp_path / "x.jsonl", instruct_rows()), "pretrain")


def test_evaluation_rows_keep_every_gold_alias(tmp_path):
    rows = [
        {"question": "Q1?", "docs": ["d1", "d2"], "golden_answers": ["A", "alias"], "pos_index": [1]},
        {"question": "Q2?", "docs": ["d1"], "answer": "B"},
        {"question": "Q3?", "docs": ["d1"], "golden_answers": []},
    ]
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    with pytest.raises(MalformedRowError, match="eval.jsonl:3: 'golden_answers' must be a non-empty list"):
        load_rows(path, "evaluate")
    loaded = load_rows(path, "evaluate", skip_malformed=True)
    assert loaded[0] == {"question": "Q1?", "documents": ["d1", "d2"], "answers": ["A", "alias"], "positives": [1]}
    assert loaded[1]["answers"] == ["B"] and loaded[1]["positives"] == []
