"""Tiny random models and a tokenizer trained on the spot, built once per session; each test gets a copy."""

import copy
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from modeling_clara import ClaraForRAG

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France, completed in 1889.",
    "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.",
    "The Amazon river flows through South America and is the largest river by discharge volume.",
    "Question: Who designed the tower? Answer: Gustave Eiffel's engineering company.",
    "Background: documents about history, science, geography and art of the world.",
] * 20

DOCUMENTS = [
    "The Eiffel Tower is in Paris and was completed in 1889.",
    "Marie Curie won two Nobel prizes, in physics and in chemistry.",
    "The Amazon is the largest river in South America by discharge.",
    "Gustave Eiffel's company designed and built the tower.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
    )


def build_base(kind: str, vocab_size: int, seed: int = 0, initializer_range: float = 0.02, hidden_size: int = 32):
    """A tiny random base. A larger `initializer_range` lets the frozen LM head express confident predictions
    (behind RMSNorm, logits are bounded by the embedding norms), which the learning tests need."""
    torch.manual_seed(seed)
    sizes = dict(
        initializer_range=initializer_range,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **sizes)).eval()
    return MistralForCausalLM(MistralConfig(tie_word_embeddings=False, sliding_window=None, **sizes)).eval()


def randomize_adapters(model: ClaraForRAG, seed: int = 1) -> ClaraForRAG:
    """LoRA B starts at zero, which makes the three adapters identical: give each its own random weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or name.startswith("memory_embeddings"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def _clara_models(tokenizer):
    built = {}
    for kind in ("llama", "mistral"):
        base = build_base(kind, len(tokenizer))
        model = ClaraForRAG.from_base_model(base, tokenizer, doc_max_length=16, compression_rate=4, generation_top_k=2)
        built[kind] = randomize_adapters(model)
    return built


@pytest.fixture(params=["llama", "mistral"])
def clara(request, _clara_models):
    """A tiny ClaraForRAG (tied-embedding Llama and untied Mistral) with random adapters, in eval mode."""
    return copy.deepcopy(_clara_models[request.param])


@pytest.fixture
def llama_clara(_clara_models):
    return copy.deepcopy(_clara_models["llama"])


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


FICTIONAL_FACTS = [
    ("Zorland", "Quvi", "blue"),
    ("Peltria", "Osk", "green"),
    ("Marnova", "Telu", "red"),
    ("Quessia", "Bram", "gold"),
    ("Dovania", "Lirr", "white"),
    ("Fentrel", "Ashk", "black"),
    ("Gorrim", "Vell", "grey"),
    ("Hastor", "Mupp", "pink"),
]


def scp_rows():
    """Small SCP rows about fictional countries: QA rows and paraphrase rows."""
    rows = []
    for country, capital, colour in FICTIONAL_FACTS:
        document = f"{country} is a country. Its capital is {capital}. Its flag is {colour}."
        rows.append(
            {
                "data_type": "qa",
                "question": [f"What is the capital of {country}?", f"What colour is the flag of {country}?"],
                "answers": [capital, colour],
                "docs": [document],
            }
        )
        rows.append(
            {"data_type": "paraphrase", "question": [], "answers": [f"{capital} is the capital of {country}."], "docs": [document]}
        )
    return rows


def instruct_rows():
    documents = [f"{country} is a country. Its capital is {capital}." for country, capital, _ in FICTIONAL_FACTS]
    return [
        {"question": f"What is the capital of {country}?", "docs": [documents[i], documents[(i + 1) % 8]], "answer": capital}
        for i, (country, capital, _) in enumerate(FICTIONAL_FACTS)
    ]


@pytest.fixture(scope="session")
def tiny_base_dir(tokenizer, tmp_path_factory):
    """A tiny Llama and the test tokenizer saved as a base-model folder."""
    directory = tmp_path_factory.mktemp("tiny_base")
    build_base("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
