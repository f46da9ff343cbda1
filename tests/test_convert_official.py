"""`clara convert-official`: a checkpoint in the reference release's layout, made here the way the reference makes
one (LoRA adapters injected into the base and saved with peft's `get_peft_model_state_dict`, which is what
transformers' `add_adapter` / `get_adapter_state_dict` run; the new tokens appended to its vocabulary), converts to a
ClaraForRAG that holds exactly its weights and computes with them."""

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from clara_cli.main import main
from modeling_clara import ClaraForRAG
from modeling_clara.convert_official_clara import convert_official_checkpoint
from testing_utils import DOCUMENTS

QUESTIONS = ["Where is the Eiffel Tower?", "Who won two Nobel prizes?"]
ADAPTERS = {"encoder_adapter": "compressor", "decoder_adapter": "generator", "query_reasoner_adapter": "query_reasoner"}


def write_reference_checkpoint(base_dir, folder, stage="stage2", different_mem_tokens=True, adapters=tuple(ADAPTERS)):
    """The reference's save_pretrained, on a tiny base: config.json, adapters.pth, decoder_first_last_layers.pth.
    Returns the reference decoder (the base with its three adapters) and its tokenizer."""
    torch.manual_seed(3)
    decoder = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    num_memory = 16 // 4
    memory = [f"<MEM{i}>" for i in range(num_memory)] if different_mem_tokens else ["<MEM>"]
    tokenizer.add_special_tokens({"additional_special_tokens": [*memory, "<AE>", "<ENC>", "<SEP>"]})
    decoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        decoder.get_input_embeddings().weight[-len(memory) - 3 :].normal_(0, 0.5)  # trained rows of the new tokens
    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.1)
    with warnings.catch_warnings():  # several adapters on one model are the reference's design, as ours
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in adapters:
            inject_adapter_in_model(copy.deepcopy(lora), decoder, adapter_name=name)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    folder.mkdir(parents=True)
    config = {
        "model_type": "CLaRa", "auto_map": {"AutoConfig": "modeling_clara.CLaRaConfig", "AutoModel": "modeling_clara.CLaRa"},
        "decoder_model_name": str(base_dir), "compr_rate": 4, "doc_max_length": 16, "lora": True, "lora_r": 16,
        "training_stage": stage, "sep": True, "different_mem_tokens": different_mem_tokens, "generation_top_k": 2,
        "max_new_tokens": 12,
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({name: adapter_state_dict(decoder, name) for name in adapters}, folder / "adapters.pth")
    first_last = {k: v for k, v in decoder.named_parameters() if "embed_tokens.weight" in k or "lm_head.weight" in k}
    torch.save(first_last, folder / "decoder_first_last_layers.pth")
    return decoder.eval(), tokenizer


def adapter_state_dict(decoder, name):
    return {key: value.cpu() for key, value in get_peft_model_state_dict(decoder, adapter_name=name).items()}


def activate(decoder, name):
    for module in decoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(name)


@pytest.mark.parametrize("different_mem_tokens", [True, False])
def test_conversion_holds_exactly_the_reference_weights_and_computes_with_them(tiny_base_dir, tmp_path, different_mem_tokens):
    decoder, tokenizer = write_reference_checkpoint(tiny_base_dir, tmp_path / "compression-4", different_mem_tokens=different_mem_tokens)
    converted = convert_official_checkpoint(tmp_path / "compression-4", tmp_path / "converted")
    assert converted.config.training_stage == "joint" and converted.config.num_memory_tokens == 4
    assert converted.generation_config.max_new_tokens == 12

    parameters = dict(converted.named_parameters())
    for reference_name, component in ADAPTERS.items():
        state = adapter_state_dict(decoder, reference_name)
        adapter = converted.adapter_names[component]
        ours = {name: value for name, value in parameters.items() if f".{adapter}." in name}
        assert len(ours) == len(state)
        for key, value in state.items():
            matrix = "lora_A" if ".lora_A." in key else "lora_B"
            name = "language_model." + key.replace(f".{matrix}.weight", f".{matrix}.{adapter}.weight")
            assert torch.equal(ours[name], value), name
    rows = decoder.get_input_embeddings().weight
    memory_ids = [tokenizer.convert_tokens_to_ids(f"<MEM{i}>" if different_mem_tokens else "<MEM>") for i in range(4)]
    expected_rows = rows[[*memory_ids, tokenizer.convert_tokens_to_ids("<ENC>"), tokenizer.convert_tokens_to_ids("<SEP>")]]
    assert torch.equal(converted.added_token_embeddings.weight, expected_rows)

    # The compressed vectors are the reference decoder's last-layer states at the memory positions, with its
    # encoder adapter; the answers are its greedy generations with its decoder adapter, from those vectors.
    batch = converted.processor.tokenize_for_compression(DOCUMENTS[:2])
    embeds = converted.embed_tokens(batch["input_ids"])
    activate(decoder, "encoder_adapter")
    with torch.no_grad():
        states = decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                         position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
    reference_memories = states.hidden_states[-1][:, -4:]
    memories = converted.compress_documents(DOCUMENTS[:2])
    torch.testing.assert_close(memories, reference_memories, atol=1e-5, rtol=1e-5)

    prompt = converted.processor.tokenize_for_generation(QUESTIONS, 1)
    prompt_embeds = converted.generator_embeddings(prompt["input_ids"], memories.reshape(-1, memories.shape[-1]))
    activate(decoder, "decoder_adapter")
    with torch.no_grad():
        generated = decoder.generate(inputs_embeds=prompt_embeds, attention_mask=prompt["attention_mask"], max_new_tokens=6,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     suppress_tokens=list(range(len(tokenizer) - 7, len(tokenizer))))
    expected_answers = [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert converted.generate_from_compressed(QUESTIONS, memories[:, None], max_new_tokens=6) == expected_answers

    loaded = ClaraForRAG.from_pretrained(tmp_path / "converted")  # adapter-only, its base referenced
    assert torch.equal(loaded.compress_documents(DOCUMENTS[:2]), memories)


def test_a_stage_1_checkpoint_gets_the_compressor_as_query_reasoner(tiny_base_dir, tmp_path):
    write_reference_checkpoint(tiny_base_dir, tmp_path / "ckpt", stage="stage1", adapters=("encoder_adapter", "decoder_adapter"))
    converted = convert_official_checkpoint(tmp_path / "ckpt")
    assert converted.config.training_stage == "scp"
    assert torch.equal(converted.encode_queries(QUESTIONS), converted.compress_documents(QUESTIONS))


def test_bad_reference_checkpoints_fail_naming_the_problem(tiny_base_dir, tokenizer, tmp_path):
    write_reference_checkpoint(tiny_base_dir, tmp_path / "repo" / "compression-4")
    with pytest.raises(FileNotFoundError, match=r"holds \['compression-4'\]: pass one of them"):
        convert_official_checkpoint(tmp_path / "repo")
    source = tmp_path / "repo" / "compression-4"

    adapters = torch.load(source / "adapters.pth", weights_only=True)
    key = next(iter(adapters["decoder_adapter"]))
    del adapters["decoder_adapter"][key]
    torch.save(adapters, source / "adapters.pth")
    with pytest.raises(ValueError, match="decoder_adapter lacks 1 of our generator weights"):
        convert_official_checkpoint(source)
    adapters["decoder_adapter"][key.replace("layers.0", "layers.7")] = torch.zeros(1)
    torch.save(adapters, source / "adapters.pth")
    with pytest.raises(ValueError, match="has no counterpart"):
        convert_official_checkpoint(source)

    other_base = tmp_path / "other_base"
    from testing_utils import build_base

    build_base("llama", len(tokenizer), seed=5).save_pretrained(other_base)
    tokenizer.save_pretrained(other_base)
    with pytest.raises(ValueError, match="trained on another base model"):
        convert_official_checkpoint(source, base=str(other_base))

    torch.save({"decoder_adapter": {"x": object()}}, source / "adapters.pth")  # anything but tensors is refused
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_official_checkpoint(source)


def test_clara_convert_official_command(tiny_base_dir, tmp_path, capsys):
    write_reference_checkpoint(tiny_base_dir, tmp_path / "ckpt")
    assert main(["convert-official", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    assert "Converted" in capsys.readouterr().out
    assert ClaraForRAG.from_pretrained(tmp_path / "out").config.training_stage == "joint"
