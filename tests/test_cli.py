import pytest

from clara_cli.demo import python_reference_corpus
from clara_cli.main import main
from modeling_clara import MemoryBank


def test_demo_compresses_a_real_corpus_and_answers_beside_text_rag(clara, tmp_path, capsys):
    clara.save_pretrained(tmp_path / "clara")
    questions = ["What happens when a pass statement is executed?", "What does break do?"]
    assert main(["demo", "--model", str(tmp_path / "clara"), "--questions", *questions, "--k", "2",
                 "--max_new_tokens", "3", "--bank", str(tmp_path / "bank")]) == 0
    printed = capsys.readouterr().out
    corpus = python_reference_corpus()
    assert len(corpus) > 50 and {"pass", "break", "with"} <= {passage["id"] for passage in corpus}
    assert f"Corpus: {len(corpus)} passages of the Python Language Reference" in printed
    assert f"memory bank ({len(corpus)}, 4, 32)" in printed
    assert "UNTRAINED" in printed  # said plainly
    assert printed.count("CLaRa    retrieved") == 2 and printed.count("text RAG retrieved (BM25) pass") == 1
    assert printed.count("first token") == 4
    assert MemoryBank.load(tmp_path / "bank").ids == [passage["id"] for passage in corpus]


@pytest.mark.parametrize(
    "options, message",
    [(["--k", "0"], "--k 0"), (["--k", "-1"], "--k -1"), (["--max_new_tokens", "0"], "max_new_tokens"),
     (["--questions", " "], "--questions")],
)
def test_demo_options_are_checked_before_anything_loads(options, message):
    with pytest.raises(ValueError, match=message):
        main(["demo", "--model", "/nonexistent", *options])


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
        ("demo", ("DemoArguments",)),
        ("synthesize", ("SynthesizeArguments", "BackendConfig", "SynthesisConfig")),
        ("evaluate", ("EvaluationConfig",)),
        ("compress", ("CompressArguments",)),
        ("ask", ("AskArguments",)),
        ("push", ("PushArguments",)),
    ],
)
def test_help_lists_every_field_of_the_command_configs(command, config_classes, capsys):
    from dataclasses import fields

    import clara_cli.demo as demo
    import clara_cli.main as cli
    import data_synthesis
    import evaluation
    import trainers

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in config_classes:
        config_class = next(getattr(m, name) for m in (cli, demo, data_synthesis, evaluation, trainers) if hasattr(m, name))
        for config_field in fields(config_class):
            assert f"--{config_field.name}" in help_text, config_field.name


def test_top_level_help_names_the_commands(capsys):
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    commands = ("demo", "train", "synthesize", "evaluate", "compress", "ask", "push", "convert-official")
    assert all(command in help_text for command in commands)
