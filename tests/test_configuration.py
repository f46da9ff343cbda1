import json

import pytest
from transformers import AutoConfig, LlamaConfig

from modeling_clara import ClaraConfig


def test_constructs_with_no_arguments():
    config = ClaraConfig()
    assert config.model_type == "clara"
    assert isinstance(config.text_config, LlamaConfig)
    assert config.num_memory_tokens == 256 // 32


def test_round_trip_through_save_and_load(tmp_path):
    config = ClaraConfig(
        text_config=LlamaConfig(hidden_size=64, num_hidden_layers=3),
        compression_rate=16,
        doc_max_length=128,
        lora_r=8,
        lora_target_modules=["q_proj", "v_proj"],
        generator_adapter="decoder_adapter",
        memory_token_ids=list(range(100, 108)),
        encoder_token_id=108,
        separator_token_id=109,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ClaraConfig)
    expected = config.to_dict()
    assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in expected.items() if k != "_name_or_path"
    }
    assert loaded.text_config.hidden_size == 64
    assert loaded.num_memory_tokens == 8


def test_unknown_option_raises():
    with pytest.raises(TypeError, match="compresion_rate"):
        ClaraConfig(compresion_rate=16)


def test_unknown_key_in_saved_config_raises(tmp_path):
    ClaraConfig().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["retrieval_temprature"] = 0.1
    path.write_text(json.dumps(data))
    with pytest.raises(TypeError, match="retrieval_temprature"):
        ClaraConfig.from_pretrained(tmp_path)


def test_generation_parameters_do_not_belong_in_the_config():
    with pytest.raises(TypeError, match="max_new_tokens"):
        ClaraConfig(max_new_tokens=32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"compression_rate": 3}, "does not divide"),
        ({"compression_rate": 0}, ">= 1"),
        ({"compression_rate": -4}, ">= 1"),
        ({"doc_max_length": 0}, "doc_max_length"),
        ({"lora_dropout": 1.5}, "LoRA"),
        ({"generator_adapter": "compressor"}, "distinct"),
        ({"retrieval_temperature": 0.0}, "retrieval_temperature"),
        ({"generation_top_k": 0}, "generation_top_k"),
        ({"memory_token_ids": [1, 2, 3]}, "memory_token_ids"),
        ({"retrieval_temperature": float("nan")}, "retrieval_temperature must be a finite number"),
        ({"mse_weight": float("inf")}, "mse_weight must be a finite number"),
        ({"lora_dropout": float("nan")}, "lora_dropout must be a finite number"),
        ({"text_config": {"model_type": "llama", "max_position_embeddings": 256}}, "does not fit the base model's context"),
    ],
)
def test_invalid_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        ClaraConfig(**overrides)


def test_whole_numbers_are_accepted_for_float_fields_and_stored_as_floats(tmp_path):
    config = ClaraConfig(mse_weight=1, lora_dropout=0, retrieval_temperature=1)
    assert (config.mse_weight, config.lora_dropout, config.retrieval_temperature) == (1.0, 0.0, 1.0)
    assert all(isinstance(getattr(config, name), float) for name in ("mse_weight", "lora_dropout", "retrieval_temperature"))
    config.save_pretrained(tmp_path)
    assert isinstance(ClaraConfig.from_pretrained(tmp_path).mse_weight, float)


def test_wrong_type_raises():
    with pytest.raises(Exception, match="compression_rate"):
        ClaraConfig(compression_rate="16")
