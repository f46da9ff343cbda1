"""`ClaraConfig.center_memories`: the generator reads memories centred over documents (docs/diagnosis.md)."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError

from modeling_clara import ClaraConfig, ClaraForRAG
from testing_utils import (
    DOCUMENTS,
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
)
from trainers import (
    ClaraModelConfig,
    InstructConfig,
    InstructTrainer,
    JointConfig,
    JointTrainer,
    SCPConfig,
    SCPTrainer,
)


@pytest.fixture
def centered(tokenizer):
    return randomize_adapters(new_model(tokenizer, center_memories=True))


def read_by_generator(model: ClaraForRAG, memories: torch.Tensor) -> torch.Tensor:
    """The vectors the generator's prompt holds where `memories` ([N, n_mem, hidden], one document per row) go."""
    input_ids = model.processor.tokenize_for_generation(["Restate."] * len(memories), 1)["input_ids"]
    placeholders = torch.isin(input_ids, torch.tensor(model.config.memory_token_ids))
    return model.generator_embeddings(input_ids, memories[:, None])[placeholders].reshape(memories.shape)


def embedding_rms(model: ClaraForRAG) -> torch.Tensor:
    return model.language_model.get_input_embeddings().weight.pow(2).mean().sqrt()


def test_in_training_the_generator_reads_memories_minus_the_batch_mean_at_the_embeddings_scale(centered):
    memories = centered.compress_documents(DOCUMENTS).requires_grad_()
    centered.train()
    read = read_by_generator(centered, memories)
    centred = memories - memories.mean(0)
    scale = embedding_rms(centered) / centred.pow(2).mean().sqrt()
    torch.testing.assert_close(read, centred * scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(read.pow(2).mean().sqrt(), embedding_rms(centered), rtol=1e-4, atol=0)
    torch.testing.assert_close(centered.memory_scale, scale.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(centered.memory_mean, memories.mean(0).detach(), rtol=1e-5, atol=1e-6)
    # What every document shares gets no gradient: the compressor cannot learn one prompt for all of them.
    read.mul(torch.randn_like(read)).sum().backward()
    assert memories.grad.abs().sum() > 0
    torch.testing.assert_close(memories.grad.sum(0), torch.zeros_like(memories.grad[0]), rtol=0, atol=1e-6)


def test_later_batches_move_the_running_mean_that_inference_reads(centered):
    memories = centered.compress_documents(DOCUMENTS)
    centered.train()
    read_by_generator(centered, memories)
    scale, first_mean = centered.memory_scale.clone(), centered.memory_mean.clone()
    read_by_generator(centered, memories[:2])
    expected_mean = first_mean.lerp(memories[:2].mean(0), centered.config.memory_mean_momentum)
    torch.testing.assert_close(centered.memory_mean, expected_mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(centered.memory_scale, scale)  # fixed by the first batch
    centered.eval()
    expected = (memories - expected_mean) * scale
    torch.testing.assert_close(read_by_generator(centered, memories), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(read_by_generator(centered, memories[:1]), expected[:1], rtol=1e-4, atol=1e-5)
    centered.train()  # e.g. right after trainer.train(): inference runs without gradients and reads the running mean
    with torch.no_grad():
        torch.testing.assert_close(read_by_generator(centered, memories), expected, rtol=1e-4, atol=1e-5)
    centered.answer(["Where is the Eiffel Tower?"], [DOCUMENTS[:2]], max_new_tokens=2)
    assert torch.equal(centered.memory_mean, expected_mean)  # inference does not update it


def test_after_loading_unset_statistics_the_next_training_batch_sets_them_again(centered, tokenizer):
    # The host remembers that the first batch set `memory_scale` (reading it each step would wait for a GPU); a load
    # must make it read the value anew, or the generator would read every memory at scale 0, all alike.
    memories = centered.compress_documents(DOCUMENTS)
    centered.train()
    for _ in range(2):  # the first batch sets the statistics, the second finds them set
        read_by_generator(centered, memories)
    assert centered.memory_scale > 0
    unset = {name: value for name, value in new_model(tokenizer, center_memories=True).state_dict().items()
             if name in ("memory_mean", "memory_scale")}
    centered.load_state_dict(unset, strict=False)
    assert centered.memory_scale == 0
    read = read_by_generator(centered, memories)
    assert centered.memory_scale > 0
    torch.testing.assert_close(read.pow(2).mean().sqrt(), embedding_rms(centered), rtol=1e-4, atol=0)


def test_before_any_training_batch_the_memories_are_read_as_they_are(centered, tokenizer):
    memories = centered.compress_documents(DOCUMENTS)
    assert torch.equal(read_by_generator(centered, memories), memories)
    plain = randomize_adapters(new_model(tokenizer))
    assert not plain.config.center_memories and not hasattr(plain, "memory_mean")
    assert torch.equal(read_by_generator(plain, memories), memories)


def test_a_first_training_batch_of_one_document_is_refused_a_later_one_reads_the_running_mean(centered):
    memories = centered.compress_documents(DOCUMENTS)
    centered.train()
    with pytest.raises(ValueError, match="at least 2 per batch"):
        read_by_generator(centered, memories[:1])
    read_by_generator(centered, memories)
    mean = centered.memory_mean.clone()
    read = read_by_generator(centered, memories[:1])  # e.g. an epoch's last batch
    torch.testing.assert_close(read, (memories[:1] - mean) * centered.memory_scale, rtol=1e-4, atol=1e-5)
    assert torch.equal(centered.memory_mean, mean)


def test_the_statistics_are_saved_and_loaded_with_the_adapters(tiny_base_dir, tmp_path):
    model = randomize_adapters(ClaraForRAG.from_base_model(tiny_base_dir, doc_max_length=16, compression_rate=4,
                                                           center_memories=True))
    model.train()
    read_by_generator(model, model.compress_documents(DOCUMENTS))
    model.eval()
    model.save_pretrained(tmp_path / "clara")
    loaded = ClaraForRAG.from_pretrained(tmp_path / "clara")
    assert loaded.config.center_memories
    assert torch.equal(loaded.memory_mean, model.memory_mean) and torch.equal(loaded.memory_scale, model.memory_scale)
    memories = model.compress_documents(DOCUMENTS)
    assert torch.equal(read_by_generator(loaded, memories), read_by_generator(model, memories))
    question = ["Where is the Eiffel Tower?"]
    assert loaded.answer(question, [DOCUMENTS[:2]], max_new_tokens=4) == model.answer(question, [DOCUMENTS[:2]], max_new_tokens=4)


def test_stage_1_trains_the_same_parameters_and_sets_the_statistics(tokenizer, tmp_path):
    model = new_model(tokenizer, center_memories=True)
    before = snapshot(model)
    SCPTrainer(model, stage_config(SCPConfig, tmp_path), train_dataset=dataset(scp_rows(), "scp")).train()
    assert changed_parameters(model, before) == component_parameters(
        model, "compressor", "generator", "added_token_embeddings"
    )
    assert model.memory_scale > 0 and model.memory_mean.abs().sum() > 0


def test_stages_2_and_3_train_the_same_parameters_and_update_the_running_mean(tokenizer, tmp_path):
    model = randomize_adapters(new_model(tokenizer, center_memories=True, generation_top_k=1))
    model.train()
    read_by_generator(model, model.compress_documents(DOCUMENTS))  # the statistics a stage-1 run leaves
    model.config.training_stage = "scp"
    for trainer_class, config_class, stage in ((InstructTrainer, InstructConfig, "instruct"), (JointTrainer, JointConfig, "joint")):
        rows = joint_rows() if stage == "joint" else instruct_rows()
        options = {"generator_init": "keep"} if stage == "instruct" else {}
        config = stage_config(config_class, tmp_path / stage, **options)
        trainer = trainer_class(model, config, train_dataset=dataset(rows, stage))
        before, mean = snapshot(model), model.memory_mean.clone()
        trainer.train()
        assert changed_parameters(model, before) == component_parameters(model, *trainer_class.trainable_components)
        assert not torch.equal(model.memory_mean, mean)


def test_the_settings_are_checked_and_fixed_by_stage_1(centered):
    with pytest.raises(ValueError, match="memory_mean_momentum"):
        ClaraConfig(memory_mean_momentum=0.0)
    with pytest.raises(StrictDataclassFieldValidationError, match="center_memories"):
        ClaraConfig(center_memories="yes")
    with pytest.raises(ValueError, match="center_memories: the model has True, asked for False"):
        ClaraModelConfig(center_memories=False).apply_to(centered)
    ClaraModelConfig(memory_mean_momentum=0.5).apply_to(centered)
    assert centered.config.memory_mean_momentum == 0.5


def test_training_with_one_row_per_batch_is_refused_before_work_starts(tokenizer, tmp_path):
    model = new_model(tokenizer, center_memories=True)
    with pytest.raises(ValueError, match="per_device_train_batch_size to at least 2"):
        SCPTrainer(model, stage_config(SCPConfig, tmp_path, per_device_train_batch_size=1),
                   train_dataset=dataset(scp_rows(), "scp"))
