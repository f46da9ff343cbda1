import json
import math
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

from clara_cli.main import main, parse_train_args
from modeling_clara import ClaraForRAG
from testing_utils import (
    FICTIONAL_FACTS,
    HostReads,
    build_base,
    changed_parameters,
    component_parameters,
    dataset,
    instruct_rows,
    joint_rows,
    new_model,
    randomize_adapters,
    scp_rows,
    snapshot,
    stage_config,
    write_jsonl,
)
from trainers import (
    CHECKPOINTING_ARGUMENT,
    ClaraModelConfig,
    InstructConfig,
    InstructTrainer,
    JointConfig,
    JointTrainer,
    MalformedRowError,
    SCPConfig,
    SCPTrainer,
)

# ---------------------------------------------------------------- exactly the intended parameters train


def test_scp_trains_exactly_compressor_generator_and_added_token_embeddings(tokenizer, tmp_path):
    model = new_model(tokenizer)
    before = snapshot(model)
    trainer = SCPTrainer(model, stage_config(SCPConfig, tmp_path), train_dataset=dataset(scp_rows(), "scp"))
    trainer.train()
    expected = component_parameters(model, "compressor", "generator", "added_token_embeddings")
    assert changed_parameters(model, before) == expected
    logged = trainer.state.log_history[0]
    assert {"loss", "lm_loss", "mse_loss", "truncated_documents", "truncated_answers"} <= logged.keys()


def test_scp_with_gradient_checkpointing_trains_the_weights_it_trains_without(tokenizer, tmp_path):
    trained = []
    for checkpointing in (False, True):
        model = new_model(tokenizer)
        config = stage_config(SCPConfig, tmp_path / str(checkpointing), **{CHECKPOINTING_ARGUMENT: checkpointing})
        SCPTrainer(model, config, train_dataset=dataset(scp_rows(), "scp")).train()
        trained.append(model)
    without, with_checkpointing = trained
    assert any(getattr(m, "gradient_checkpointing", False) for m in with_checkpointing.language_model.modules())
    weights = dict(without.named_parameters())
    for name, parameter in with_checkpointing.named_parameters():  # the same operations recomputed: equal values
        torch.testing.assert_close(parameter, weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_flops_estimate_is_the_trainers_with_the_parameters_counted_once(tokenizer, tmp_path, monkeypatch):
    model = new_model(tokenizer)
    trainer = SCPTrainer(model, stage_config(SCPConfig, tmp_path), train_dataset=dataset(scp_rows(), "scp"))
    counts = []
    count_parameters = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kwargs: counts.append(kwargs) or count_parameters(**kwargs))
    trainer.train()
    assert trainer.state.global_step > 1 and trainer.state.total_flos > 0
    assert len(counts) == 1
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch)


def test_instruct_reinitialises_the_generator_and_trains_compressor_and_generator(tokenizer, tmp_path):
    model = randomize_adapters(new_model(tokenizer))
    model.config.training_stage = "scp"
    compressor_before = {n: p.clone() for n, p in model.named_parameters() if ".compressor." in n}
    trainer = InstructTrainer(
        model, stage_config(InstructConfig, tmp_path, max_steps=1, learning_rate=1e-9), train_dataset=dataset(instruct_rows(), "instruct")
    )
    generator_b = [p for n, p in model.named_parameters() if ".generator." in n and "lora_B" in n]
    assert all(torch.all(p == 0) for p in generator_b)  # a new generator adapter
    assert all(torch.equal(p, compressor_before[n]) for n, p in model.named_parameters() if ".compressor." in n)
    before = snapshot(model)
    trainer.args.learning_rate = 1e-2
    trainer.args.max_steps = 3
    trainer.train()
    changed = changed_parameters(model, before)
    assert changed == component_parameters(model, "compressor", "generator", "added_token_embeddings")


def test_joint_starts_the_query_reasoner_from_the_compressor_and_freezes_the_compressor(tokenizer, tmp_path):
    model = randomize_adapters(new_model(tokenizer, generation_top_k=1))
    model.config.training_stage = "instruct"
    # Evaluated after every step, the best model chosen by a metric the trainer records itself.
    config = stage_config(JointConfig, tmp_path, eval_strategy="steps", eval_steps=1, metric_for_best_model="recall@2")
    trainer = JointTrainer(
        model, config, train_dataset=dataset(joint_rows(), "joint"), eval_dataset=dataset(joint_rows(), "joint"),
        model_args=ClaraModelConfig(generation_top_k=2),
    )
    parameters = dict(model.named_parameters())
    for name in component_parameters(model, "compressor"):
        assert torch.equal(parameters[name], parameters[name.replace(".compressor.", ".query_reasoner.")])
    before = snapshot(model)
    trainer.train()
    assert changed_parameters(model, before) == component_parameters(model, "query_reasoner", "generator")
    logged = trainer.state.log_history[0]
    assert {"recall@2", "precision@2", "lm_loss"} <= logged.keys() and "mse_loss" not in logged
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == 3 and trainer.state.best_metric == max(e["eval_recall@2"] for e in evaluations)
    metrics = trainer.evaluate()  # returns the recorded metrics too, and logs them once
    assert {"eval_loss", "eval_lm_loss", "eval_recall@2", "eval_precision@2"} <= metrics.keys()
    assert trainer.state.log_history[-1] == {**metrics, "epoch": trainer.state.epoch, "step": trainer.state.global_step}


@pytest.mark.parametrize("stage", ["scp", "instruct", "joint", "joint, documents precomputed"])
def test_a_training_step_never_makes_the_host_wait_for_the_device(tokenizer, tmp_path, stage):
    # On a GPU each host read of a device value waits for the device to finish all queued work; the host's own work
    # of the step (Python, queuing kernels, collating the next batch) then no longer overlaps the device's.
    reads = HostReads()

    class RecordFromTheThirdStep(TrainerCallback):
        # The first steps make what is then kept: the memory-token ids on the device, `memory_scale` (set by the
        # first step, read once more by the second).
        def on_step_begin(self, args, state, control, **kwargs):
            reads.recording = state.global_step >= 2

        def on_step_end(self, args, state, control, **kwargs):
            reads.recording = state.global_step < args.max_steps

    model = new_model(tokenizer, center_memories=True)
    settings = dict(max_steps=5, logging_steps=10)  # logging reads the recorded values, once per logging step
    if stage == "scp":
        trainer = SCPTrainer(model, stage_config(SCPConfig, tmp_path, **settings), train_dataset=dataset(scp_rows(), "scp"))
    elif stage == "instruct":
        model.config.training_stage = "scp"
        trainer = InstructTrainer(
            model, stage_config(InstructConfig, tmp_path, **settings), train_dataset=dataset(instruct_rows(), "instruct")
        )
    else:
        model.config.training_stage = "instruct"
        config = stage_config(JointConfig, tmp_path, precompute_document_memories=stage.endswith("precomputed"), **settings)
        trainer = JointTrainer(
            model, config, train_dataset=dataset(joint_rows(), "joint"), model_args=ClaraModelConfig(generation_top_k=2)
        )
    trainer.add_callback(RecordFromTheThirdStep())
    with reads:
        trainer.train()
    assert trainer.state.global_step == 5 and not reads.recording
    assert reads.sites == []


def test_gradient_accumulation_matches_one_large_batch(tokenizer, tmp_path):
    # float64: the normalisation is exact (measured: 1e-12 apart), while float32 rounding of differently shaped
    # batches, amplified by Adam's normalised steps at lr 1e-2, reaches 2e-4 on QA rows: a machine-dependent margin.
    rows = dataset(scp_rows()[:4], "scp")
    results = []
    for micro_batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        model = new_model(tokenizer).double()
        config = stage_config(SCPConfig, tmp_path, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation)
        SCPTrainer(model, config, train_dataset=rows).train()
        results.append(snapshot(model))
    assert changed_parameters(new_model(tokenizer).double(), results[0])  # training moved the weights
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-9, rtol=0, msg=name)


# ---------------------------------------------------------------- checkpoints and bad input


def test_training_stops_at_the_first_logging_step_with_a_non_finite_loss(tokenizer, tmp_path):
    model = new_model(tokenizer)
    generator_weight = next(p for n, p in model.named_parameters() if ".generator." in n and "lora_A" in n)

    class PoisonAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    generator_weight[0, 0] = float("nan")

    config = stage_config(SCPConfig, tmp_path, max_steps=5, logging_steps=2)
    trainer = SCPTrainer(model, config, train_dataset=dataset(scp_rows(), "scp"), callbacks=[PoisonAfterFirstStep()])
    with pytest.raises(FloatingPointError, match=r"'lm_loss': nan.*up to step 2: the weights are no longer finite"):
        trainer.train()
    assert trainer.state.global_step == 2  # not a step more
    last = trainer.state.log_history[-1]  # logged before stopping, `loss` as it is (logging_nan_inf_filter is off)
    assert last["step"] == 2 and math.isnan(last["lm_loss"]) and math.isnan(last["loss"])


@pytest.mark.parametrize("cudnn_attention", [False, True])
def test_training_keeps_attention_off_cudnn_unless_asked_and_restores_the_setting(tokenizer, tmp_path, cudnn_attention):
    seen = []

    class RecordAttentionBackend(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("a crashed run")

    before = torch.backends.cuda.cudnn_sdp_enabled()
    config = stage_config(SCPConfig, tmp_path, max_steps=3, cudnn_attention=cudnn_attention)
    trainer = SCPTrainer(new_model(tokenizer), config, train_dataset=dataset(scp_rows(), "scp"),
                         callbacks=[RecordAttentionBackend()])
    with pytest.raises(RuntimeError, match="a crashed run"):
        trainer.train()
    assert before and seen == [cudnn_attention] * 2
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored, also after the crash


def test_output_is_a_complete_checkpoint_of_its_stage(tokenizer, tmp_path):
    model = new_model(tokenizer)
    trainer = SCPTrainer(model, stage_config(SCPConfig, tmp_path, max_steps=1), train_dataset=dataset(scp_rows(), "scp"))
    trainer.train()
    trainer.save_model(str(tmp_path / "scp"))
    loaded = ClaraForRAG.from_pretrained(tmp_path / "scp")
    assert loaded.config.training_stage == "scp"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # The next stage takes the directory; the stage after that refuses it.
    InstructTrainer(str(tmp_path / "scp"), stage_config(InstructConfig, tmp_path), train_dataset=dataset(instruct_rows(), "instruct"))
    with pytest.raises(ValueError, match="'scp' starts from an untrained model, but this model's training_stage is 'scp'"):
        SCPTrainer(loaded, stage_config(SCPConfig, tmp_path), train_dataset=dataset(scp_rows(), "scp"))


@pytest.mark.parametrize(
    "trainer_class, config_class, stage, message",
    [
        (InstructTrainer, InstructConfig, None, "from a 'scp' checkpoint, but .* is None"),
        (JointTrainer, JointConfig, "joint", "from a 'instruct' checkpoint or a 'scp' checkpoint, but .* is 'joint'"),
    ],
)
def test_wrong_stage_checkpoints_are_refused(tokenizer, tmp_path, trainer_class, config_class, stage, message):
    model = new_model(tokenizer)
    model.config.training_stage = stage
    with pytest.raises(ValueError, match=message):
        trainer_class(model, stage_config(config_class, tmp_path), train_dataset=dataset(joint_rows(), "joint"))


def test_a_missing_data_file_fails_before_a_model_loads(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_file: no data file at .*absent.jsonl"):
        stage_config(SCPConfig, tmp_path, train_file=str(tmp_path / "absent.jsonl"))
    with pytest.raises(FileNotFoundError, match="eval_file"):
        stage_config(SCPConfig, tmp_path, eval_file=str(tmp_path / "absent.jsonl"))


def test_stage_option_values_are_checked(tmp_path):
    with pytest.raises(ValueError, match="generator_init"):
        stage_config(InstructConfig, tmp_path, generator_init="random")
    with pytest.raises(ValueError, match="query_reasoner_init"):
        stage_config(JointConfig, tmp_path, query_reasoner_init="generator")
    with pytest.raises(ValueError, match="distillation_weight must be >= 0, got -1.0"):
        stage_config(SCPConfig, tmp_path, distillation_weight=-1.0)
    with pytest.raises(ValueError, match="distillation_weight"):  # stage 3's generator reads no row's own documents
        parse_train_args("joint", ["--distillation_weight", "1"])


def test_a_data_file_in_the_wrong_format_fails_before_training(tokenizer, tmp_path):
    model = new_model(tokenizer)
    model.config.training_stage = "scp"
    scp_file = write_jsonl(tmp_path / "scp.jsonl", scp_rows())
    with pytest.raises(MalformedRowError, match="scp.jsonl:1: 'question' must be a non-empty string"):
        InstructTrainer(model, stage_config(InstructConfig, tmp_path, train_file=scp_file))


def test_joint_data_with_fewer_candidates_than_top_k_fails_before_training(tokenizer, tmp_path):
    model = new_model(tokenizer)
    model.config.training_stage = "instruct"
    joint_file = write_jsonl(tmp_path / "joint.jsonl", instruct_rows())  # two candidates per row
    config = stage_config(JointConfig, tmp_path, train_file=joint_file)
    with pytest.raises(MalformedRowError, match=r"joint.jsonl:1: 2 candidate documents .* fewer than the top-k \(3\)"):
        JointTrainer(model, config, model_args=ClaraModelConfig(generation_top_k=3))


def test_rows_that_would_fail_in_training_are_refused_when_read(tokenizer, tmp_path):
    model = new_model(tokenizer)
    model.config.training_stage = "scp"
    long_question = " ".join(["Which country has the capital that the documents describe?"] * 60)
    rows = instruct_rows()[:3]
    rows[1] = {**rows[1], "question": long_question}  # the prompt alone is longer than max_length
    rows[2] = {**rows[2], "answer": "<MEM0><SEP> and <|im_end|>"}  # control-token text: trains as text
    data = write_jsonl(tmp_path / "instruct.jsonl", rows)
    with pytest.raises(MalformedRowError, match=r"instruct.jsonl:2: the generator prompt alone has \d+ tokens, max_length=512"):
        InstructTrainer(model, stage_config(InstructConfig, tmp_path, train_file=data))
    trainer = InstructTrainer(
        model, stage_config(InstructConfig, tmp_path, train_file=data, skip_malformed_rows=True, max_steps=1)
    )
    assert [row["question"] for row in trainer.train_dataset] == [rows[0]["question"], rows[2]["question"]]
    trainer.train()  # both kept rows in one batch
    assert trainer.state.global_step == 1


def test_resuming_checks_the_checkpoints_stage_and_data(tokenizer, tmp_path):
    scp_data = write_jsonl(tmp_path / "scp.jsonl", scp_rows())
    saving = dict(save_strategy="steps", save_steps=1, max_steps=1)
    scp = SCPTrainer(new_model(tokenizer), stage_config(SCPConfig, tmp_path, train_file=scp_data, **saving))
    scp.train()
    scp.save_model(str(tmp_path / "scp"))
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert json.loads((checkpoint / "clara_training.json").read_text())["stage"] == "scp"

    instruct_data = write_jsonl(tmp_path / "instruct.jsonl", instruct_rows())
    instruct = InstructTrainer(
        str(tmp_path / "scp"), stage_config(InstructConfig, tmp_path, output_dir=str(tmp_path / "instruct"), train_file=instruct_data)
    )
    with pytest.raises(ValueError, match="checkpoint-1 is a checkpoint of stage 'scp'; this is stage 'instruct'"):
        instruct.train(resume_from_checkpoint=str(checkpoint))  # was: trained on and saved as 'scp'
    with pytest.raises(ValueError, match="No checkpoint to resume from"):
        instruct.train(resume_from_checkpoint=True)

    other_data = write_jsonl(tmp_path / "other.jsonl", scp_rows()[::-1])
    other = SCPTrainer(new_model(tokenizer), stage_config(SCPConfig, tmp_path, train_file=other_data, **saving))
    with pytest.raises(ValueError, match="was trained on .*scp.jsonl.*this run reads .*other.jsonl"):
        other.train(resume_from_checkpoint=True)
    same = SCPTrainer(new_model(tokenizer), stage_config(SCPConfig, tmp_path, train_file=scp_data, **{**saving, "max_steps": 2}))
    same.train(resume_from_checkpoint=True)
    assert same.state.global_step == 2


def test_a_run_may_not_overwrite_its_input_checkpoint_or_exceed_the_context(tokenizer, tmp_path):
    model = new_model(tokenizer)
    model.config.training_stage = "scp"
    model.save_pretrained(tmp_path / "scp")
    rows = dataset(instruct_rows(), "instruct")
    with pytest.raises(ValueError, match="is the checkpoint this run starts from"):
        InstructTrainer(str(tmp_path / "scp"), stage_config(InstructConfig, tmp_path, output_dir=str(tmp_path / "scp")), train_dataset=rows)
    with pytest.raises(ValueError, match=r"max_length=1024 exceeds the base model's context \(512 positions\)"):
        InstructTrainer(str(tmp_path / "scp"), stage_config(InstructConfig, tmp_path, max_length=1024), train_dataset=rows)


def test_model_settings_are_checked_and_the_architecture_is_fixed_after_stage_1(tokenizer):
    model = new_model(tokenizer)
    with pytest.raises(ValueError, match="generation_top_k must be >= 1"):
        ClaraModelConfig(generation_top_k=0).apply_to(model)
    with pytest.raises(ValueError, match="compression_rate: the model has 4, asked for 8"):
        ClaraModelConfig(compression_rate=8).apply_to(model)
    ClaraModelConfig(compression_rate=4, mse_weight=0.5, retrieval_temperature=0.1).apply_to(model)
    assert model.config.mse_weight == 0.5 and model.config.retrieval_temperature == 0.1


# ---------------------------------------------------------------- the command line


RECIPES = Path(__file__).resolve().parents[1] / "hub_configs" / "recipes"


def test_recipes_parse_with_overrides(tmp_path):
    model_args, config = parse_train_args(
        "joint", ["--config", str(RECIPES / "mistral-7b-cr16" / "joint.yaml"), "--generation_top_k", "3", "--use_cpu", "true"]
    )
    assert isinstance(config, JointConfig) and isinstance(model_args, ClaraModelConfig)
    assert model_args.generation_top_k == 3 and config.learning_rate == 5e-6 and config.bf16
    model_args, config = parse_train_args("scp", ["--config", str(RECIPES / "mistral-7b-cr16" / "scp.yaml"), "--use_cpu", "true"])
    assert model_args.compression_rate == 16 and model_args.config_overrides()["mse_weight"] == 0.1
    model_args, _ = parse_train_args("scp", ["--config", str(RECIPES / "smollm2-135m-cpu" / "scp.yaml")])
    assert model_args.config_overrides()["center_memories"] is True
    for stage in ("scp", "instruct", "joint"):
        for recipe in ("mistral-7b-cr16", "mistral-7b-cr32", "smollm2-135m-cpu"):
            parse_train_args(stage, ["--config", str(RECIPES / recipe / f"{stage}.yaml"), "--use_cpu", "true"])


def test_unknown_recipe_keys_and_options_raise(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1.0e-4\ncompresion_rate: 16\n")
    with pytest.raises(ValueError, match="compresion_rate"):
        parse_train_args("scp", ["--config", str(recipe)])
    with pytest.raises(ValueError, match="compresion_rate"):
        parse_train_args("scp", ["--compresion_rate", "16"])


@pytest.mark.parametrize("stage", ["scp", "instruct", "joint"])
def test_train_help_lists_every_field_of_both_configs(stage, capsys):
    from dataclasses import fields

    from trainers import STAGE_CLASSES

    with pytest.raises(SystemExit) as exit_info:
        main(["train", stage, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for config_class in (ClaraModelConfig, STAGE_CLASSES[stage][0]):
        for config_field in fields(config_class):
            if config_field.init and not config_field.name.startswith("_"):
                assert f"--{config_field.name}" in help_text, config_field.name


def test_clara_train_runs_a_stage_end_to_end(tiny_base_dir, tmp_path):
    data = write_jsonl(tmp_path / "scp.jsonl", scp_rows())
    output = tmp_path / "scp"
    arguments = [
        "train", "scp", "--config", str(RECIPES / "smollm2-135m-cpu" / "scp.yaml"),
        "--model_name_or_path", tiny_base_dir, "--train_file", data, "--output_dir", str(output),
        "--compression_rate", "4", "--doc_max_length", "16", "--max_steps", "2", "--report_to", "none",
        "--save_strategy", "no",
    ]
    assert main(arguments) == 0
    model = ClaraForRAG.from_pretrained(output)
    assert model.config.training_stage == "scp" and model.config.num_memory_tokens == 4


def test_precomputed_document_memories_train_the_same_weights(tokenizer, tmp_path):
    # float64: the bank and the training batches compress documents in batches of different shapes, whose float
    # rounding differs (~1e-7 relative in float32, which Adam's normalised steps at lr 1e-2 amplify to ~1e-5 on some
    # machines). In float64 that noise is ~1e-16, so a 1e-10 tolerance holds with orders of magnitude to spare.
    results = []
    for precompute in (False, True):
        model = randomize_adapters(new_model(tokenizer, lora_dropout=0.1)).double()
        model.config.training_stage = "instruct"
        config = stage_config(JointConfig, tmp_path, precompute_document_memories=precompute)
        trainer = JointTrainer(
            model, config, train_dataset=dataset(joint_rows(), "joint"), model_args=ClaraModelConfig(generation_top_k=2)
        )
        batch = trainer.data_collator([trainer.train_dataset[0]])
        assert ("document_memories" in batch) == precompute and ("document_input_ids" in batch) != precompute
        trainer.train()
        results.append(snapshot(model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-10, rtol=0, msg=name)


def test_rows_with_fewer_documents_are_padded_and_masked(tokenizer):
    from trainers.collators import InstructCollator

    model = new_model(tokenizer)
    rows = [
        {"question": "Capital of Zorland?", "documents": ["Zorland: Quvi.", "Peltria: Osk."], "answer": "Quvi"},
        {"question": "Capital of Peltria?", "documents": [" ".join(["Peltria: Osk."] * 9)], "answer": "Osk"},
    ]
    batch = InstructCollator(model.processor, max_length=512)(rows)
    assert batch["document_mask"].tolist() == [[True, True], [True, False]]
    assert torch.equal(batch["document_input_ids"][1, 1], batch["document_input_ids"][1, 0])
    assert float(batch["truncated_documents"]) == pytest.approx(1 / 3)  # of the three real documents
    placeholders = torch.isin(batch["input_ids"], torch.tensor(model.config.memory_token_ids)).sum(-1)
    assert placeholders.tolist() == [8, 4]  # the generator reads only the real documents
    output = model(**{k: v for k, v in batch.items() if not k.startswith("truncated")})
    assert torch.isfinite(output.loss)


@pytest.mark.parametrize(
    ("trainer_class", "config_class", "rows", "stage"),
    [(SCPTrainer, SCPConfig, scp_rows, "scp"), (InstructTrainer, InstructConfig, instruct_rows, "instruct"),
     (JointTrainer, JointConfig, joint_rows, "joint")],
)
def test_the_collators_keep_the_logits_of_the_answers_only(tokenizer, tmp_path, trainer_class, config_class, rows, stage):
    model = new_model(tokenizer)
    model.config.training_stage = {"scp": None, "instruct": "scp", "joint": "instruct"}[stage]  # what each starts from
    trainer = trainer_class(model, stage_config(config_class, tmp_path), train_dataset=dataset(rows(), stage))
    batch = trainer.data_collator(list(trainer.train_dataset))
    labelled = (batch["labels"] != -100).any(0)
    length, first_answer_token = batch["labels"].shape[1], int(labelled.int().argmax())
    assert batch["logits_to_keep"] == length - first_answer_token + 1 < length  # from the position predicting it


def test_abbreviated_options_are_not_guessed():
    with pytest.raises(ValueError, match="'--compression_rat'"):
        parse_train_args("scp", ["--compression_rat", "16"])


def test_the_generator_prompt_never_depends_on_the_document(tokenizer):
    """Nothing but the memories may tell the generator which document it is writing about."""
    from trainers.collators import SCPCollator

    processor = new_model(tokenizer).processor
    collate = SCPCollator(processor, max_length=512)
    paraphrase = {"data_type": "paraphrase", "questions": [], "answers": ["The same target."]}
    qa = {"data_type": "qa", "questions": ["Capital?"], "answers": ["Quvi"]}
    for row in (paraphrase, qa):
        batches = []
        for document in ("Zorland is a country.", "Peltria is a country far away."):
            torch.manual_seed(0)
            batches.append(collate([{**row, "document": document}]))
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batches[0][key], batches[1][key]), key
        assert not torch.equal(batches[0]["document_input_ids"], batches[1]["document_input_ids"])


# ---------------------------------------------------------------- distillation from the text


def test_distillation_adds_the_kl_from_the_bare_base_reading_the_text_the_compressor_reads(tokenizer, tmp_path):
    # float64: the loss difference is exact up to ~1e-15, far from any machine's rounding. A base of larger weights
    # (initializer_range 0.5) predicts unevenly, so that the two readers' distributions differ measurably.
    model = randomize_adapters(new_model(tokenizer, initializer_range=0.5)).double()
    model.config.training_stage = "scp"
    processor = model.processor
    long_document = " ".join(f"{country} is a country. Its capital is {capital}." for country, capital, _ in FICTIONAL_FACTS)
    rows = [
        {"question": "What is the capital of Zorland?", "docs": [long_document], "answer": "Quvi"},
        {"question": "What is the capital of Peltria?", "docs": ["Peltria is a country.", "Its capital is Osk."],
         "answer": "Its capital is Osk, a city of Peltria."},
    ]
    prompt_lengths = processor.tokenize_for_generation(
        [row["question"] for row in rows], num_documents=[1, 2]
    )["attention_mask"].sum(-1).tolist()
    max_length = prompt_lengths[1] + 3  # the second answer is cut to its first 3 tokens, the first is whole
    config = stage_config(InstructConfig, tmp_path, distillation_weight=0.5, max_length=max_length)
    trainer = InstructTrainer(model, config, train_dataset=dataset(rows, "instruct"))
    batch = trainer.data_collator(list(trainer.train_dataset))
    assert float(batch["truncated_answers"]) == 0.5
    cut_ids = processor._text_ids([long_document])[0][: model.config.doc_max_length]
    text_ids = batch["text_input_ids"][0].tolist()
    assert any(text_ids[i : i + len(cut_ids)] == cut_ids for i in range(len(text_ids)))  # the compressor's 16 tokens
    assert processor._text_ids([long_document])[0][: len(cut_ids) + 1] not in [
        text_ids[i : i + len(cut_ids) + 1] for i in range(len(text_ids))
    ]

    with_distillation = trainer.compute_loss(model, dict(batch))
    trainer.args.distillation_weight = 0.0
    without = trainer.compute_loss(model, dict(batch))

    # The reference: each row alone, the text reader a fresh copy of the base, the answer tokens matched by hand.
    base = build_base("llama", len(tokenizer), initializer_range=0.5).double()
    # The reference's generator computes every position's logits; the trainer's only the answers' (logits_to_keep).
    outputs = model(**{k: v for k, v in batch.items() if not k.startswith(("truncated", "text_", "logits_to_keep"))})
    assert 0 < batch["logits_to_keep"] < outputs.logits.shape[1]
    assert 0 < batch["text_logits_to_keep"] < batch["text_input_ids"].shape[1]  # the text reader's LM head, too
    divergences = []
    for row in range(2):
        student_positions = [t for t in range(batch["labels"].shape[1] - 1) if batch["labels"][row, t + 1] != -100]
        text_mask = batch["text_attention_mask"][row].bool()
        text_ids, text_labels = batch["text_input_ids"][row][text_mask], batch["text_labels"][row][text_mask]
        text_positions = [t for t in range(len(text_ids) - 1) if text_labels[t + 1] != -100][: len(student_positions)]
        assert [int(batch["labels"][row, t + 1]) for t in student_positions] == [int(text_labels[t + 1]) for t in text_positions]
        with torch.no_grad():
            text_log_probs = base(input_ids=text_ids[None]).logits[0, text_positions].log_softmax(-1)
        log_probs = outputs.logits[row, student_positions].log_softmax(-1)
        divergences += (text_log_probs.exp() * (text_log_probs - log_probs)).sum(-1).tolist()
    assert len(divergences) == 3 + len(processor._text_ids(["Quvi"])[0]) + 2  # the cut answer's 3, the whole one's + <|im_end|>\n
    reference = sum(divergences) / len(divergences)
    assert reference > 1e-3
    torch.testing.assert_close(with_distillation - without, torch.tensor(0.5 * reference, dtype=torch.float64), atol=1e-12, rtol=1e-9)


def test_distillation_trains_exactly_the_stages_parameters_and_is_logged(tokenizer, tmp_path):
    model = new_model(tokenizer, initializer_range=0.5)  # readers that differ clearly: a KL far above rounding
    before = snapshot(model)
    trainer = SCPTrainer(model, stage_config(SCPConfig, tmp_path, distillation_weight=1.0), train_dataset=dataset(scp_rows(), "scp"))
    trainer.train()
    assert changed_parameters(model, before) == component_parameters(model, "compressor", "generator", "added_token_embeddings")
    assert all(entry["distillation_loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)
    without = SCPTrainer(new_model(tokenizer), stage_config(SCPConfig, tmp_path), train_dataset=dataset(scp_rows(), "scp"))
    assert not any(key.startswith("text_") for key in without.data_collator(list(without.train_dataset)[:2]))


def test_rows_too_long_for_the_text_reader_are_refused_when_read(tokenizer, tmp_path):
    model = new_model(tokenizer)
    model.config.training_stage = "scp"
    rows = instruct_rows()[:2]
    rows[0] = {**rows[0], "docs": rows[0]["docs"][:1]}
    rows[1] = {**rows[1], "docs": [" ".join(rows[1]["docs"] * 4)], "answer": " ".join([rows[1]["answer"]] * 20)}
    prompt_length = int(model.processor.tokenize_for_generation([rows[1]["question"]], num_documents=1)["attention_mask"].sum())
    context = prompt_length + 25  # the first row's text sequence fits in it, the second's does not
    model.config.text_config.max_position_embeddings = context
    data = write_jsonl(tmp_path / "instruct.jsonl", rows)
    InstructTrainer(model, stage_config(InstructConfig, tmp_path, train_file=data, max_length=context))  # the generator's is cut
    with pytest.raises(MalformedRowError, match=rf"instruct.jsonl:2: its text prompt and answer \(distillation from the "
                                                rf"text\) have \d+ tokens, more than the base model's context \({context} positions\)"):
        InstructTrainer(model, stage_config(InstructConfig, tmp_path, train_file=data, max_length=context, distillation_weight=1.0))


# ---------------------------------------------------------------- batches grouped by length


def scp_rows_of_many_lengths():
    """`scp_rows` whose paraphrase answers grow from 1 to 8 repetitions: generator sequences of very different lengths."""
    rows = scp_rows()
    for i, row in enumerate(rows[1::2]):
        row["answers"] = [" ".join(row["answers"] * (i + 1))]
    return rows


@pytest.mark.parametrize(
    ("trainer_class", "config_class", "rows", "stage"),
    [(SCPTrainer, SCPConfig, scp_rows_of_many_lengths, "scp"), (JointTrainer, JointConfig, joint_rows, "joint")],
)
def test_row_lengths_count_every_token_a_row_puts_into_its_batch(tokenizer, tmp_path, trainer_class, config_class, rows, stage):
    from trainers.clara_trainer import row_lengths

    model = new_model(tokenizer)
    model.config.training_stage = {"scp": None, "joint": "instruct"}[stage]
    trainer = trainer_class(
        model, stage_config(config_class, tmp_path), train_dataset=dataset(rows(), stage),
        model_args=ClaraModelConfig(generation_top_k=2) if stage == "joint" else None,
    )
    expected = []
    for row in trainer.train_dataset:
        alone = trainer.data_collator([row])  # one row: no padding, every position is the row's
        expected.append(sum(alone[key].numel() for key in ("input_ids", "document_input_ids", "query_input_ids") if key in alone))
    assert row_lengths(trainer.data_collator, trainer.train_dataset) == expected
    assert len(set(expected)) > 1


def test_group_by_length_batches_rows_of_similar_length_and_reads_every_row_once(tokenizer, tmp_path):
    seen = {}
    for strategy in ("random", "group_by_length", "batch_rebalance"):
        model = new_model(tokenizer)
        before = snapshot(model)
        # 64 rows in batches of 4: the sampler sorts megabatches of 16 rows (transformers' default for this size).
        config = stage_config(SCPConfig, tmp_path / strategy, train_sampling_strategy=strategy, max_steps=-1,
                              num_train_epochs=1, per_device_train_batch_size=4, logging_steps=100)
        trainer = SCPTrainer(model, config, train_dataset=dataset(scp_rows_of_many_lengths() * 4, "scp"))
        batches, original_step = [], trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            rows = [tuple(ids[mask].tolist()) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"].bool())]
            batches.append(rows)
            return original_step(model, inputs, num_items_in_batch)

        trainer.training_step = training_step
        trainer.train()
        assert changed_parameters(model, before)
        seen[strategy] = batches
    rows = {strategy: sorted(row for batch in batches for row in batch) for strategy, batches in seen.items()}
    assert len(rows["random"]) == 64  # every row once, in every order
    assert rows["group_by_length"] == rows["random"] and rows["batch_rebalance"] == rows["random"]
    padding = {
        strategy: sum(max(map(len, batch)) * len(batch) - sum(map(len, batch)) for batch in batches)
        for strategy, batches in seen.items()
    }
    assert padding["group_by_length"] < padding["random"] / 2, padding


def test_group_by_length_keeps_given_lengths_and_needs_a_dataset(tokenizer, tmp_path):
    config = stage_config(SCPConfig, tmp_path, train_sampling_strategy="group_by_length")
    rows = dataset(scp_rows(), "scp")
    given = list(range(len(rows)))
    trainer = SCPTrainer(new_model(tokenizer), config, train_dataset=rows.add_column("length", given))
    assert trainer.train_dataset["length"] == given
    with pytest.raises(ValueError, match="needs the rows as a datasets.Dataset"):
        SCPTrainer(new_model(tokenizer), config, train_dataset=list(rows))
