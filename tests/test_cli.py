import pytest

from clara_cli.main import main
from modeling_clara import ClaraForRAG
from testing_utils import build_base


def test_demo_builds_compresses_answers_and_saves(tokenizer, tmp_path, capsys):
    base_directory, output_directory = tmp_path / "base", tmp_path / "clara"
    build_base("llama", len(tokenizer)).save_pretrained(base_directory)
    tokenizer.save_pretrained(base_directory)
    exit_code = main(
        ["demo", "--model_name_or_path", str(base_directory), "--compression_rate", "4", "--doc_max_length", "16",
         "--max_new_tokens", "3", "--k", "2", "--save", str(output_directory)]
    )
    printed = capsys.readouterr().out
    assert exit_code == 0
    assert "into memories of shape (3, 4, 32)" in printed
    assert "Answer from 2 compressed passage(s)" in printed
    assert "Answer from the raw text" in printed
    loaded = ClaraForRAG.from_pretrained(output_directory)
    assert loaded.config.num_memory_tokens == 4


@pytest.mark.parametrize(
    "options, message",
    [(["--k", "0"], "--k 0"), (["--k", "-1"], "--k -1"), (["--k", "4"], "--k 4"), (["--max_new_tokens", "0"], "max_new_tokens")],
)
def test_demo_options_are_checked_before_anything_loads(options, message):
    with pytest.raises(ValueError, match=message):
        main(["demo", "--model_name_or_path", "/nonexistent", *options])


def test_unknown_options_and_commands_raise():
    with pytest.raises(ValueError, match="compression_rat"):
        main(["demo", "--compression_rat", "4"])
    with pytest.raises(SystemExit):
        main(["demos"])
    with pytest.raises(SystemExit, match="unknown stage|usage"):
        main(["train", "pretrain"])


@pytest.mark.parametrize(
    "command, config_classes",
    [
        ("demo", ("DemoArguments", "ClaraModelConfig")),
        ("synthesize", ("SynthesizeArguments", "BackendConfig", "SynthesisConfig")),
        ("evaluate", ("EvaluationConfig",)),
    ],
)
def test_help_lists_every_field_of_the_command_configs(command, config_classes, capsys):
    from dataclasses import fields

    import clara_cli.main as cli
    import data_synthesis
    import evaluation
    import trainers

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in config_classes:
        config_class = next(getattr(m, name) for m in (cli, data_synthesis, evaluation, trainers) if hasattr(m, name))
        for config_field in fields(config_class):
            assert f"--{config_field.name}" in help_text, config_field.name


def test_top_level_help_names_the_commands(capsys):
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert all(command in help_text for command in ("demo", "train", "synthesize", "evaluate"))
