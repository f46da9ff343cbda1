import json
import re
from collections import Counter

import pytest
from datasets import Dataset, load_dataset

from data_synthesis import (
    PROMPT_VERSION,
    LLMBackend,
    SynthesisConfig,
    parse_json,
    parse_qa_pairs,
    read_passages,
    run_synthesis,
    split_into_windows,
    synthesize_passages,
)
from data_synthesis.parsing import is_repetitive
from data_synthesis.pipeline import validate_qa
from testing_utils import write_jsonl
from trainers import load_rows

FACT = re.compile(r"The (\w+) of (\w+) is (\w+)\.")


def passage(entity: str, facts: dict[str, str]) -> str:
    return " ".join(f"The {attribute} of {entity} is {value}." for attribute, value in facts.items())


ZORLAND = passage("Zorland", {"capital": "Quvi", "flag": "blue", "river": "Osk"})
PELTRIA = passage("Peltria", {"capital": "Telu", "anthem": "Dawn", "mountain": "Bram"})


def qa_json(pairs) -> str:
    return json.dumps([{"question": q, "answer": a} for q, a in pairs])


class ScriptedBackend(LLMBackend):
    """A deterministic fake LLM that reads the facts of a passage. `overrides[task]` replaces a task's response
    (a function of the passage text and the request); `crash_after` raises after that many generate calls."""

    def __init__(self, overrides=None, crash_after=None, simple_qa_facts=1):
        self.overrides, self.crash_after, self.simple_qa_facts = overrides or {}, crash_after, simple_qa_facts
        self.calls = Counter()
        self.generate_calls = 0

    def describe(self):
        return {"backend": "scripted"}

    def generate(self, requests):
        self.generate_calls += 1
        if self.crash_after is not None and self.generate_calls > self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        return [self.respond(r) for r in requests]

    def respond(self, request):
        self.calls[request.task] += 1
        user = request.messages[-1][1]
        text = re.search(r"Passage:\n(.*?)\n\n", user, re.DOTALL).group(1)
        facts = FACT.findall(text)
        if request.task in self.overrides:
            return self.overrides[request.task](text, user)
        if request.task == "simple_qa":
            return qa_json((f"What is the {a} of {e}?", v) for a, e, v in facts[: self.simple_qa_facts])
        if request.task == "complex_qa":
            return "[]"
        if request.task == "paraphrase":
            return json.dumps({"paraphrase": " ".join(f"{e}'s {a} is {v}." for a, e, v in reversed(facts))})
        if request.task == "key_facts":
            return json.dumps({"facts": [f"{e} {a} {v}" for a, e, v in facts]})
        if request.task == "coverage":
            listed = re.findall(r"^(\d+)\. \w+ (\w+) \w+$", user, re.MULTILINE)
            asked = user.split("Questions and answers:")[1]
            return json.dumps({"missing": [int(n) for n, attribute in listed if f" {attribute} of" not in asked]})
        if request.task == "more_qa":
            wanted = re.findall(r"^- \w+ (\w+) \w+$", user, re.MULTILINE)
            return qa_json((f"What is the {a} of {e}?", v) for a, e, v in facts if a in wanted)
        if request.task == "reanswer":
            attribute = re.search(r"Question: What is the (\w+) of", user)
            values = [v for a, _, v in facts if attribute and a == attribute.group(1)]
            return json.dumps({"answer": values[0] if values else "NOT_IN_PASSAGE"})
        raise AssertionError(request.task)


def run(passages, backend=None, **config):
    backend = backend or ScriptedBackend()
    results = synthesize_passages(
        [{"id": f"p{i}", "text": text} for i, text in enumerate(passages)], backend, SynthesisConfig(**config)
    )
    return results, backend


# ---------------------------------------------------------------- the stages and the verification loop


def test_each_stage_and_the_loop_until_covered():
    (result,), backend = run([ZORLAND])
    assert [pair["answer"] for pair in result.qa] == ["Quvi", "blue", "Osk"]  # 1 simple + 2 for missing facts
    assert result.paraphrases == ["Zorland's river is Osk. Zorland's flag is blue. Zorland's capital is Quvi."]
    assert result.facts == ["Zorland capital Quvi", "Zorland flag blue", "Zorland river Osk"]
    assert result.coverage == 1.0 and result.rounds == 2
    assert backend.calls["coverage"] == 2 and backend.calls["more_qa"] == 1
    qa_row, paraphrase_row = result.rows()
    assert qa_row == {
        "data_type": "qa",
        "question": ["What is the capital of Zorland?", "What is the flag of Zorland?", "What is the river of Zorland?"],
        "answers": ["Quvi", "blue", "Osk"],
        "docs": [ZORLAND],
        "passage_id": "p0",
        "coverage": 1.0,
    }
    assert paraphrase_row["data_type"] == "paraphrase" and paraphrase_row["answers"] == result.paraphrases


def test_a_covered_passage_stops_after_one_verification():
    (result,), backend = run([ZORLAND], ScriptedBackend(simple_qa_facts=3))
    assert result.coverage == 1.0 and result.rounds == 1
    assert backend.calls["more_qa"] == 0


def test_the_loop_stops_after_max_rounds_and_records_partial_coverage():
    useless = ScriptedBackend(overrides={"more_qa": lambda text, user: "[]"})
    (result,), backend = run([ZORLAND], useless, max_rounds=3)
    assert result.rounds == 3 and backend.calls["coverage"] == 3 and backend.calls["more_qa"] == 2
    assert result.coverage == pytest.approx(1 / 3)
    assert sum(result.rejections.values()) == 0  # empty lists are answers, not errors


@pytest.mark.parametrize(
    "pairs, reason",
    [
        ([("Is the capital of Zorland Quvi?", "Quvi")], "answer_in_question"),
        ([("What is the capital of Zorland?", "Paris")], "answer_not_grounded"),
        ([("What is the capital of Zorland?", "Quvi"), ("What is the capital of Zorland ?", "Quvi")], "duplicate_question"),
        ([("What is the flag of Zorland?", "Quvi")], "reanswer_disagrees"),
        ([("What is the anthem of Zorland?", "blue")], "not_answerable"),
        ([("I'm sorry, I cannot help with that", "Quvi")], "refusal"),
        ([("Какая столица у Зорланда?", "Куви")], "wrong_language"),
    ],
)
def test_each_qa_rejection_reason_is_counted(pairs, reason):
    backend = ScriptedBackend(overrides={"simple_qa": lambda text, user: qa_json(pairs)})
    (result,), _ = run([ZORLAND], backend, max_rounds=1)
    assert result.rejections[reason] == 1
    assert all(pair["answer"] != "Paris" for pair in result.qa)


@pytest.mark.parametrize(
    "response, reason",
    [
        (json.dumps({"text": "no paraphrase field"}), "unparseable"),
        ("Zorland's river is Osk, and " * 6, "repetitive"),
        ("I'm sorry, but as an AI I cannot do that.", "refusal"),
        (json.dumps({"paraphrase": "Short."}), "paraphrase_length"),
        (json.dumps({"paraphrase": "Bananas grow in warm countries near seas and lakes everywhere."}), "paraphrase_not_grounded"),
    ],
)
def test_each_paraphrase_rejection_reason_is_counted(response, reason):
    backend = ScriptedBackend(overrides={"paraphrase": lambda text, user: response})
    (result,), _ = run([ZORLAND], backend, max_rounds=1)
    assert result.rejections[reason] == 1 and result.paraphrases == []


def test_repeated_paraphrases_are_dropped_and_variants_are_asked_for():
    prompts = []
    same = json.dumps({"paraphrase": "Zorland's river is Osk, its flag is blue and its capital is Quvi."})
    backend = ScriptedBackend(overrides={"paraphrase": lambda text, user: prompts.append(user) or same})
    (result,), _ = run([ZORLAND], backend, num_paraphrases=3, max_rounds=1)
    assert len(result.paraphrases) == 1 and result.rejections["duplicate_paraphrase"] == 2
    assert [re.search(r"rewrite number (\d)", p).group(1) for p in prompts] == ["1", "2", "3"]


def test_a_plain_text_paraphrase_is_accepted():
    plain = "Paraphrase: Quvi is Zorland's capital; its flag is blue and its river is Osk."
    (result,), _ = run([ZORLAND], ScriptedBackend(overrides={"paraphrase": lambda text, user: plain}), max_rounds=1)
    assert result.paraphrases == ["Quvi is Zorland's capital; its flag is blue and its river is Osk."]


def test_labelled_lines_are_read_as_pairs():
    lines = "Sure.\nQuestion: What is the capital of Zorland?\nAnswer: Quvi\n2. Q: What is the flag of Zorland?\nA: blue"
    (result,), _ = run([ZORLAND], ScriptedBackend(overrides={"simple_qa": lambda text, user: lines}), max_rounds=1)
    assert [pair["answer"] for pair in result.qa] == ["Quvi", "blue"]


def test_garbage_from_every_task_never_crashes():
    garbage = lambda text, user: '{"question": [[[ truncated'  # noqa: E731
    backend = ScriptedBackend(overrides={task: garbage for task in ("simple_qa", "complex_qa", "key_facts", "paraphrase")})
    (result,), _ = run([ZORLAND], backend)
    assert result.qa == [] and result.coverage is None and result.rows() == []
    assert result.rejections["unparseable"] == 2 and result.rejections["key_facts_unparseable"] == 1
    assert result.rejections["paraphrase_length"] == 1  # read as plain text, then refused


def test_looping_output_is_recognised():
    passage_start = "Zorland lies in the north, its capital is Quvi, its flag is blue and its main river is the Osk. "
    assert is_repetitive(passage_start + "I could not ask for anything. " * 5)
    assert not is_repetitive(passage_start + "Quvi has a port on the Osk, and the flag of Zorland is blue.")


def test_repairable_output_is_repaired():
    repaired = "Here you go:\n```json\n[{\"question\": \"x\"}, {\"question\": \"What is the capital of Zorland?\", \"answer\": \"Quvi\",},\n  {\"question\": \"What is the fl"
    backend = ScriptedBackend(overrides={"simple_qa": lambda text, user: repaired})
    (result,), _ = run([ZORLAND], backend, max_rounds=1)
    assert result.qa[0] == {"question": "What is the capital of Zorland?", "answer": "Quvi"}
    assert result.rejections["malformed_pair"] == 1  # the item without an answer
    assert parse_json("[1, 2,]") == [1, 2] and parse_json('{"ok": True, "n": None}') == {"ok": True, "n": None}
    assert parse_qa_pairs('{"pairs": [{"q": "How many?", "a": 3}]}') == ([{"question": "How many?", "answer": "3"}], 0)


def test_prompt_level_checks_are_independent_of_order():
    config = SynthesisConfig()
    assert validate_qa({"question": "What is the flag of Zorland?", "answer": "blue"}, ZORLAND, [], config) is None


# ---------------------------------------------------------------- the runner: files, resume, shards


def test_output_is_reference_scp_format_with_metadata_and_report(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "z", "text": ZORLAND}, {"id": "p", "text": PELTRIA}])
    output = tmp_path / "out.jsonl"
    report = run_synthesis(source, output, ScriptedBackend(), show_progress=False)
    assert report["passages"] == 2 and report["qa_rows"] == 2 and report["paraphrase_rows"] == 2
    assert report["qa_per_passage"] == {"mean": 3.0, "min": 3, "max": 3}
    assert report["coverage"]["complete"] == 2 and report["rounds_used"] == {2: 2}
    assert json.loads((tmp_path / "out.jsonl.stats.json").read_text())["passages"] == 2
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["prompt_version"] == PROMPT_VERSION and "simple_qa" in meta["prompts"] and meta["backend"] == {"backend": "scripted"}
    assert len(load_dataset("json", data_files=str(output), split="train")) == 4
    assert len(load_rows(output, "scp")) == 4  # the stage-1 trainer reads it directly


def test_a_crashed_run_resumes_to_the_same_rows_without_duplicates(tmp_path):
    passages = [{"id": f"n{i}", "text": passage(f"Land{i}", {"capital": f"City{i}", "flag": "red"})} for i in range(5)]
    source = write_jsonl(tmp_path / "in.jsonl", passages)
    config = SynthesisConfig(passages_per_batch=2)
    run_synthesis(source, tmp_path / "full.jsonl", ScriptedBackend(), config, show_progress=False)
    expected = sorted((tmp_path / "full.jsonl").read_text().splitlines())

    output = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_synthesis(source, output, ScriptedBackend(crash_after=7), config, show_progress=False)
    finished = len((tmp_path / "resumed.jsonl.done").read_text().splitlines())
    assert 0 < finished < 5
    # A crash mid-write as well: a finished passage's row without its .done line, and half a line.
    with output.open("a") as handle:
        handle.write(json.dumps({"data_type": "qa", "passage_id": "n4", "question": ["x"], "answers": ["y"], "docs": ["d"]}))
        handle.write('\n{"data_type": "qa", "passage_id": "n3", "quest')
    backend = ScriptedBackend()
    report = run_synthesis(source, output, backend, config, show_progress=False)
    assert sorted(output.read_text().splitlines()) == expected
    assert report["passages"] == 5 and report["input"]["already_done"] == finished
    assert backend.calls["simple_qa"] == 5 - finished  # only unfinished passages are redone


def test_shards_split_the_corpus_without_overlap(tmp_path):
    passages = [{"id": f"s{i}", "text": passage(f"Land{i}", {"capital": f"City{i}"})} for i in range(12)]
    source = write_jsonl(tmp_path / "in.jsonl", passages)
    run_synthesis(source, tmp_path / "all.jsonl", ScriptedBackend(), show_progress=False)
    parts = []
    for index in range(3):
        report = run_synthesis(source, tmp_path / f"part{index}.jsonl", ScriptedBackend(), shard=(index, 3), show_progress=False)
        assert report["input"].get("other_shard", 0) == 12 - report["passages"]
        parts.append(set((tmp_path / f"part{index}.jsonl").read_text().splitlines()))
    assert all(parts) and not (parts[0] & parts[1] or parts[1] & parts[2] or parts[0] & parts[2])
    assert set().union(*parts) == set((tmp_path / "all.jsonl").read_text().splitlines())
    with pytest.raises(ValueError, match="Shard 3/3"):
        run_synthesis(source, tmp_path / "x.jsonl", ScriptedBackend(), shard=(3, 3), show_progress=False)


class DescribedBackend(ScriptedBackend):
    def __init__(self, **description):
        super().__init__()
        self.description = {"backend": "scripted", **description}

    def describe(self):
        return self.description


@pytest.mark.parametrize(
    "change, named",
    [
        ({"config": SynthesisConfig(max_rounds=3)}, "settings.max_rounds: 10 -> 3"),
        ({"config": SynthesisConfig(complex_qa=False)}, "settings.complex_qa: True -> False"),
        ({"backend": DescribedBackend(model="other-model")}, "backend.model"),
        ({"shard": (0, 2)}, "shard: '0/1' -> '0/2'"),
        ({"text_field": "contents"}, "input.text_field: None -> 'contents'"),
        ({"prompt": "changed {passage}"}, "prompt_fingerprint"),
    ],
)
def test_a_resume_with_other_settings_is_refused_naming_what_differs(tmp_path, monkeypatch, change, named):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": ZORLAND, "contents": ZORLAND}])
    output = tmp_path / "out.jsonl"
    run_synthesis(source, output, DescribedBackend(model="m", url="http://a"), show_progress=False)
    meta = (tmp_path / "out.jsonl.meta.json").read_text()
    if "prompt" in change:
        monkeypatch.setitem(__import__("data_synthesis.prompts").prompts.PROMPTS, "simple_qa", change.pop("prompt"))
    arguments = {"backend": DescribedBackend(model="m", url="http://a"), "config": None, "shard": (0, 1), **change}
    with pytest.raises(ValueError, match="other settings") as error:
        run_synthesis(source, output, show_progress=False, **arguments)
    assert named in str(error.value) and "use a new output file" in str(error.value)
    assert (tmp_path / "out.jsonl.meta.json").read_text() == meta  # the first run's record is kept


def test_a_resume_may_change_the_server_url_and_records_each_run(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": ZORLAND}])
    output = tmp_path / "out.jsonl"
    run_synthesis(source, output, DescribedBackend(url="http://a"), show_progress=False)
    report = run_synthesis(source, output, DescribedBackend(url="http://b"), SynthesisConfig(passages_per_batch=2), show_progress=False)
    assert report["input"]["already_done"] == 1
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert [run["backend"]["url"] for run in meta["runs"]] == ["http://a", "http://b"]


def test_empty_input_and_conflicting_ids_are_refused_duplicates_counted(tmp_path, caplog):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="No passages in"):
        run_synthesis(empty, tmp_path / "a.jsonl", ScriptedBackend(), show_progress=False)
    with pytest.raises(ValueError, match="No passages in"):
        run_synthesis(write_jsonl(tmp_path / "blank.jsonl", [{"text": " "}]), tmp_path / "b.jsonl", ScriptedBackend(), show_progress=False)
    conflicting = write_jsonl(tmp_path / "ids.jsonl", [{"id": "x", "text": ZORLAND}, {"id": "x", "text": PELTRIA}])
    with pytest.raises(ValueError, match="Two different passages .* have the id 'x'"):
        run_synthesis(conflicting, tmp_path / "c.jsonl", ScriptedBackend(), show_progress=False)
    assert not list(tmp_path.glob("c.jsonl*"))  # refused before anything is written
    repeated = write_jsonl(tmp_path / "repeated.jsonl", [{"id": "x", "text": ZORLAND}, {"id": "x", "text": ZORLAND}])
    with caplog.at_level("WARNING"):
        report = run_synthesis(repeated, tmp_path / "d.jsonl", ScriptedBackend(), show_progress=False)
    assert report["passages"] == 1 and report["input"]["duplicate_passage"] == 1
    assert "1 duplicate_passage" in caplog.text


def test_input_encoding_problems_name_the_line(tmp_path, caplog):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"id": "first", "text": ZORLAND}).encode() + b"\n"
        + b'{"id": "bad", "text": "caf\xe9"}\n' + json.dumps({"id": "third", "text": PELTRIA}).encode() + b"\n"
    )
    counts = Counter()
    with caplog.at_level("WARNING"):
        assert [p["id"] for p in read_passages(jsonl, counts=counts)] == ["first", "third"]  # the BOM keeps row 1
    assert counts == {"malformed_input_line": 1} and f"{jsonl}:2 is not valid UTF-8 (byte 0xe9" in caplog.text
    text_file = tmp_path / "corpus.txt"
    text_file.write_bytes(b"\xef\xbb\xbfFirst passage.\n\nSecond\n\ncaf\xe9\n")
    with pytest.raises(ValueError, match=f"{text_file}:5: not valid UTF-8"):
        list(read_passages(text_file))


def test_inputs_of_every_kind_with_bad_lines_counted(tmp_path):
    jsonl = write_jsonl(
        tmp_path / "in.jsonl",
        [{"docs": [ZORLAND]}, "{broken", {"text": "   "}, {"title": "no text"}, {"contents": PELTRIA, "id": 0}],
    )
    counts = Counter()
    passages = list(read_passages(jsonl, counts=counts))
    assert [p["text"] for p in passages] == [ZORLAND, PELTRIA]
    assert passages[1]["id"] == "0" and passages[0]["id"].startswith("p-")
    assert counts == {"malformed_input_line": 2, "empty_passage": 1}
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(f"{ZORLAND}\n\n\n\n{PELTRIA}\n")
    assert [p["id"] for p in read_passages(text_file)] == ["corpus.txt:0", "corpus.txt:2"]
    saved = tmp_path / "saved_dataset"
    Dataset.from_list([{"id": "a", "passage": ZORLAND}, {"id": "b", "passage": PELTRIA}]).save_to_disk(str(saved))
    assert [p["id"] for p in read_passages(saved)] == ["a", "b"]
    assert [p["id"] for p in read_passages(Dataset.from_list([{"text": ZORLAND, "id": "c"}]))] == ["c"]
    long = {"id": "long", "text": " ".join(f"w{i}" for i in range(400))}
    windows = split_into_windows(long, window_words=180, overlap=30)
    assert [w["id"] for w in windows] == ["long#w0", "long#w1", "long#w2"]
    assert windows[1]["text"].split()[0] == "w150" and windows[-1]["text"].split()[-1] == "w399"
