import pytest
from testing_utils import build_base

from clara_cli.main import main
from modeling_clara import ClaraForRAG


def test_demo_builds_compresses_answers_and_saves(tokenizer, tmp_path, capsys):
    base_directory, output_directory = tmp_path / "base", tmp_path / "clara"
    build_base("llama", len(tokenizer)).save_pretrained(base_directory)
    tokenizer.save_pretrained(base_directory)
    exit_code = main(
        ["demo", "--base", str(base_directory), "--compression-rate", "4", "--doc-max-length", "16",
         "--max-new-tokens", "3", "--k", "2", "--save", str(output_directory)]
    )
    printed = capsys.readouterr().out
    assert exit_code == 0
    assert "into (3, 4, 32) memory vectors" in printed
    assert "Answer from 2 compressed passage(s)" in printed
    assert "Answer from the raw text" in printed
    loaded = ClaraForRAG.from_pretrained(output_directory)
    assert loaded.config.num_memory_tokens == 4


def test_unknown_option_raises():
    with pytest.raises(SystemExit):
        main(["demo", "--compression_rat", "4"])
