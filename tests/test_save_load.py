import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoProcessor

from modeling_clara import ClaraConfig, ClaraForRAG, ClaraProcessor
from testing_utils import DOCUMENTS, assert_loads_as_remote_code, build_base, randomize_adapters

QUESTIONS = ["Where is the Eiffel Tower?", "Who won two Nobel prizes?"]


def _outputs(model):
    batch = model.processor.tokenize_for_generation(QUESTIONS, 1, answers=["Paris", "Marie Curie"])
    documents = torch.stack([model.compress_documents(DOCUMENTS[:1]), model.compress_documents(DOCUMENTS[1:2])])
    with torch.no_grad():
        logits = model(**batch, document_memories=documents).logits
    return {
        "documents": model.compress_documents(DOCUMENTS),
        "queries": model.encode_queries(QUESTIONS),
        "logits": logits,
        "answers": model.answer(QUESTIONS, [DOCUMENTS, DOCUMENTS[1:]], max_new_tokens=5),
    }


@pytest.fixture
def saved(clara, tmp_path):
    clara.generation_config.max_new_tokens = 7
    clara.save_pretrained(tmp_path)
    return clara, tmp_path


def test_save_writes_safetensors_processor_and_generation_config(saved):
    _, directory = saved
    files = set(os.listdir(directory))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "processor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pth", ".pt", ".pkl")) for name in files)
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_clara.ClaraConfig",
        "AutoModel": "modeling_clara.ClaraForRAG",
    }
    assert {"modeling_clara.py", "configuration_clara.py", "processing_clara.py"} <= files
    processor_config = json.loads((directory / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_clara.ClaraProcessor"}


def test_the_processor_loads_on_its_own_with_auto_processor(saved):
    model, directory = saved
    processor = AutoProcessor.from_pretrained(directory)
    assert isinstance(processor, ClaraProcessor)
    assert processor.memory_token_ids == model.config.memory_token_ids
    assert (processor.system_prompt, processor.user_prompt_template, processor.doc_max_length) == (
        model.processor.system_prompt, model.processor.user_prompt_template, model.processor.doc_max_length
    )
    batch = processor.tokenize_for_generation(QUESTIONS, 2, answers=["Paris", "Marie Curie"])
    expected = model.processor.tokenize_for_generation(QUESTIONS, 2, answers=["Paris", "Marie Curie"])
    assert all(torch.equal(batch[key], expected[key]) for key in expected)


def test_prompt_settings_are_saved_with_the_processor(tokenizer, tmp_path):
    from testing_utils import build_base

    model = ClaraForRAG.from_base_model(
        build_base("llama", len(tokenizer)), tokenizer, doc_max_length=16, compression_rate=4,
        system_prompt="Answer in one word.", user_prompt_template="Docs: {documents}\nQ: {question}",
    )
    model.save_pretrained(tmp_path)
    loaded = ClaraForRAG.from_pretrained(tmp_path)
    assert loaded.processor.system_prompt == "Answer in one word."
    assert loaded.processor.user_prompt_template == "Docs: {documents}\nQ: {question}"


def test_save_without_a_processor_writes_nothing(clara, tmp_path):
    clara._processor = None
    with pytest.raises(ValueError, match="processor is not set"):
        clara.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_processor_settings_are_checked(tokenizer, clara):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        ClaraProcessor()
    with pytest.raises(ValueError, match="lacks CLaRa's tokens"):
        ClaraProcessor(tokenizer)
    with pytest.raises(ValueError, match="doc_max_length"):
        ClaraProcessor(clara.processor.tokenizer, doc_max_length=0)
    without_template = copy.deepcopy(clara.processor.tokenizer)
    without_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ClaraProcessor(without_template)


@pytest.mark.parametrize(
    "template, problem",
    [
        ("Question: {question}", r"got \['question'\]"),
        ("{documents} {question} {context}", "'context'"),  # would fail only when generating
        ("{documents} {question} {0}", "'0'"),
        ("{documents} {question} {", "Single '{'"),
        ("{{documents}} {question}", r"got \['question'\]"),  # escaped: a literal, no slot
        ("{documents} {question!r}", "'question!r'"),  # would hide the question
    ],
)
def test_prompt_templates_are_checked_when_the_processor_is_built(clara, template, problem):
    with pytest.raises(ValueError, match=problem):
        ClaraProcessor(clara.processor.tokenizer, user_prompt_template=template)
    ClaraProcessor(clara.processor.tokenizer, user_prompt_template="{{literal}} {documents}\n{question}")


def test_a_processor_of_another_layout_is_refused(clara, tokenizer):
    other = ClaraProcessor.from_base_tokenizer(tokenizer, num_memory_tokens=2, doc_max_length=16)
    with pytest.raises(ValueError, match="memory_token_ids"):
        clara.processor = other


def test_load_gives_identical_outputs(saved):
    model, directory = saved
    loaded = ClaraForRAG.from_pretrained(directory)
    expected, actual = _outputs(model), _outputs(loaded)
    assert actual["answers"] == expected["answers"]
    for key in ("documents", "queries", "logits"):
        assert torch.equal(actual[key], expected[key]), key
    assert loaded.processor.tokenizer.get_vocab() == model.processor.tokenizer.get_vocab()
    assert loaded.processor.tokenizer.padding_side == "left"
    assert loaded.generation_config.max_new_tokens == 7
    assert not loaded.training


def test_every_adapter_is_restored_with_its_own_weights(saved):
    model, directory = saved
    loaded = AutoModel.from_pretrained(directory)
    assert isinstance(loaded, ClaraForRAG)
    assert isinstance(AutoConfig.from_pretrained(directory), ClaraConfig)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    per_adapter = {}
    for adapter in model.adapter_names.values():
        keys = sorted(k for k in original if f".{adapter}." in k)
        assert keys, adapter
        for key in keys:
            assert torch.equal(original[key], restored[key]), key
        per_adapter[adapter] = torch.cat([original[k].flatten() for k in keys])
    # The three adapters hold different weights, so no adapter was written with another's.
    values = list(per_adapter.values())
    assert not torch.equal(values[0], values[1]) and not torch.equal(values[1], values[2])
    assert torch.equal(original["added_token_embeddings.weight"], restored["added_token_embeddings.weight"])


def test_loading_restores_the_frozen_base(saved):
    _, directory = saved
    loaded = ClaraForRAG.from_pretrained(directory)
    for name, parameter in loaded.named_parameters():
        assert parameter.requires_grad == ("lora_" in name or name.startswith("added_token_embeddings")), name


@pytest.mark.parametrize(
    "dropped, message",
    [(".generator.", r"adapter\(s\) \['generator'\]"), ("added_token_embeddings", "added-token embeddings")],
)
def test_checkpoint_missing_a_part_fails_loudly(saved, dropped, message):
    _, directory = saved
    weights = load_file(directory / "model.safetensors")
    kept = {key: value for key, value in weights.items() if dropped not in key}
    assert len(kept) < len(weights)
    save_file(kept, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        ClaraForRAG.from_pretrained(directory)


@pytest.mark.parametrize(
    "removed, message",
    [
        (["tokenizer.json"], "lacks the tokenizer"),  # was: "need sentencepiece or tiktoken"
        (["generation_config.json"], "lacks the generation config"),  # was: a hub URL
        (["processor_config.json"], "lacks the processor"),  # was: "does not match ... doc_max_length"
        (["config.json"], "lacks the config"),
        (["model.safetensors"], "lacks the weights"),
        (["tokenizer.json", "config.json"], "lacks the config .*, the tokenizer"),
        (["chat_template.jinja"], "no chat template"),  # was: loaded, failing at the first answer
    ],
)
def test_an_incomplete_checkpoint_names_what_it_lacks(saved, removed, message):
    _, directory = saved
    for name in removed:
        (directory / name).unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        ClaraForRAG.from_pretrained(directory)


def test_a_base_model_folder_is_not_taken_for_a_clara_checkpoint_nor_the_reverse(saved, tiny_base_dir):
    from modeling_clara import load_base_model

    with pytest.raises(ValueError, match="holds a 'llama' model, not a CLaRa checkpoint"):
        ClaraForRAG.from_pretrained(tiny_base_dir)  # was: "lacks processor_config.json"-like errors
    _, clara_directory = saved
    with pytest.raises(ValueError, match="is a CLaRa checkpoint, not a base LLM"):
        load_base_model(str(clara_directory))  # stage 1 on a CLaRa; was: a list of every AutoModel config class


def test_a_missing_checkpoint_folder_is_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="No CLaRa checkpoint at .*absent"):
        ClaraForRAG.from_pretrained(tmp_path / "absent")  # was: "Repo id must be in the form ..."
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="No CLaRa checkpoint at absent"):
        ClaraForRAG.from_pretrained("./absent")


def test_trainer_state_dict_is_honoured(clara, tmp_path):
    state_dict = {key: value.clone() for key, value in clara.state_dict().items()}
    state_dict["added_token_embeddings.weight"].fill_(0.5)
    clara.save_pretrained(tmp_path, state_dict=state_dict)
    loaded = ClaraForRAG.from_pretrained(tmp_path)
    assert torch.all(loaded.added_token_embeddings.weight == 0.5)


# ---------------------------------------------------------------- adapter-only checkpoints


@pytest.fixture
def on_base_folder(tiny_base_dir):
    """A CLaRa built on a base loaded from a folder, so it has a base to reference."""
    torch.manual_seed(0)
    model = randomize_adapters(ClaraForRAG.from_base_model(tiny_base_dir, doc_max_length=16, compression_rate=4))
    assert model.config.base_model_name_or_path == str(Path(tiny_base_dir).resolve())
    return model


def test_adapter_only_is_the_default_and_loads_to_identical_outputs(on_base_folder, tmp_path):
    on_base_folder.save_pretrained(tmp_path / "clara")
    files = set(os.listdir(tmp_path / "clara"))
    assert "clara_adapters.safetensors" in files and not {"model.safetensors", "model.safetensors.index.json"} & files
    saved = load_file(tmp_path / "clara" / "clara_adapters.safetensors")
    assert saved.keys() == on_base_folder.own_state_dict().keys()
    assert all("lora_" in key or key.startswith("added_token_embeddings") for key in saved)
    loaded = ClaraForRAG.from_pretrained(tmp_path / "clara")
    assert loaded.state_dict().keys() == on_base_folder.state_dict().keys()
    for name, value in on_base_folder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    expected, actual = _outputs(on_base_folder), _outputs(loaded)
    assert actual["answers"] == expected["answers"]
    for key in ("documents", "queries", "logits"):
        assert torch.equal(actual[key], expected[key]), key


def test_an_adapter_equal_to_another_is_stored_once_and_restored(on_base_folder, tmp_path):
    on_base_folder.copy_adapter("compressor", "query_reasoner")  # what a stage-2 model's query reasoner starts as
    on_base_folder.save_pretrained(tmp_path / "clara")
    path = tmp_path / "clara" / "clara_adapters.safetensors"
    saved = load_file(path)
    assert not any(".query_reasoner." in key for key in saved)
    assert any(".compressor." in key for key in saved) and any(".generator." in key for key in saved)
    loaded = ClaraForRAG.from_pretrained(tmp_path / "clara")
    for name, value in on_base_folder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # The restored copy is a parameter of its own: training one adapter does not move the other.
    with torch.no_grad():
        next(p for n, p in loaded.named_parameters() if ".query_reasoner." in n and "lora_B" in n).add_(1)
    assert torch.equal(loaded.compress_documents(DOCUMENTS[:2]), on_base_folder.compress_documents(DOCUMENTS[:2]))

    tensors, metadata = load_file(path), {"format": "pt", "clara_adapter_copies": json.dumps({"query_reasoner": "nope"})}
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="do not name this model's adapters"):
        ClaraForRAG.from_pretrained(tmp_path / "clara")


def test_the_base_can_be_given_and_a_different_base_is_refused(on_base_folder, tiny_base_dir, tokenizer, tmp_path):
    on_base_folder.save_pretrained(tmp_path / "clara")
    moved = tmp_path / "moved_base"
    shutil.copytree(tiny_base_dir, moved)
    loaded = ClaraForRAG.from_pretrained(tmp_path / "clara", base_model=str(moved))
    assert torch.equal(loaded.compress_documents(DOCUMENTS[:2]), on_base_folder.compress_documents(DOCUMENTS[:2]))

    wider = tmp_path / "wider_base"
    build_base("llama", len(tokenizer), hidden_size=48).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    with pytest.raises(ValueError, match="not the one this checkpoint was trained on: hidden_size: checkpoint 32, base 48"):
        ClaraForRAG.from_pretrained(tmp_path / "clara", base_model=str(wider))
    other_vocabulary = tmp_path / "other_vocabulary"
    shutil.copytree(tiny_base_dir, other_vocabulary)
    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<extra>"])
    changed.save_pretrained(other_vocabulary)
    with pytest.raises(ValueError, match="another vocabulary"):
        ClaraForRAG.from_pretrained(tmp_path / "clara", base_model=str(other_vocabulary))
    shutil.rmtree(moved)
    with pytest.raises(ValueError, match="holds its base's weights: base_model= does not apply"):
        on_base_folder.save_pretrained(tmp_path / "full", save_base_model=True)
        ClaraForRAG.from_pretrained(tmp_path / "full", base_model=tiny_base_dir)


def test_full_saves_stay_available_and_a_folder_holds_one_format(on_base_folder, clara, tmp_path):
    folder = tmp_path / "clara"
    on_base_folder.save_pretrained(folder, save_base_model=True)
    assert (folder / "model.safetensors").is_file() and not (folder / "clara_adapters.safetensors").exists()
    on_base_folder.save_pretrained(folder)  # adapter-only over the full save: the stale full weights go
    assert (folder / "clara_adapters.safetensors").is_file() and not (folder / "model.safetensors").exists()
    with pytest.raises(ValueError, match="base has no name or path"):
        clara.save_pretrained(tmp_path / "unreferenced", save_base_model=False)
    with pytest.raises(TypeError, match="max_shard_size"):
        on_base_folder.save_pretrained(tmp_path / "x", max_shard_size="1MB")


@pytest.mark.parametrize("checkpoint", ["full", "adapter-only"])
def test_remote_code_loads_in_a_process_without_the_package(saved, on_base_folder, tmp_path_factory, checkpoint):
    model, directory = saved
    if checkpoint == "adapter-only":
        model, directory = on_base_folder, tmp_path_factory.mktemp("adapter_only")
        model.save_pretrained(directory)
        assert (directory / "base_models.py").is_file()  # the remote code loads the base with it
    assert_loads_as_remote_code(directory, model, tmp_path_factory.mktemp("remote"))
