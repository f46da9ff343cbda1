"""Helpers of the tests: tiny random models, a tokenizer trained on the spot, small real-format data rows, trainer
settings and parameter snapshots. Imported by the test modules and by `conftest.py` (which only holds fixtures)."""

import gzip
import json
import string
import traceback
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from modeling_clara import ClaraForRAG

# The 1,000 real SCP rows of the reference release, where the checkout has `../shared` beside it (CI does).
REFERENCE_SCP_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "scp_pretrain_sample.jsonl"
requires_reference_sample = pytest.mark.skipif(
    not REFERENCE_SCP_SAMPLE.is_file(), reason=f"the reference SCP sample is not at {REFERENCE_SCP_SAMPLE}"
)

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
            if "lora_" in name or name.startswith("added_token_embeddings"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def write_jsonl(path, rows) -> str:
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


def new_model(tokenizer, initializer_range=0.02, hidden_size=32, **overrides) -> ClaraForRAG:
    """A fresh (untrained) tiny Llama CLaRa: 16-token documents, 4 memory tokens, no LoRA dropout."""
    settings = {"doc_max_length": 16, "compression_rate": 4, "lora_dropout": 0.0, **overrides}
    base = build_base("llama", len(tokenizer), initializer_range=initializer_range, hidden_size=hidden_size)
    return ClaraForRAG.from_base_model(base, tokenizer, **settings)


def stage_config(config_class, tmp_path, **overrides):
    """A stage config for quick CPU runs: 3 steps at lr 1e-2, batch 2, no saving, no reporting."""
    settings = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_steps=3,
        learning_rate=1e-2,
        warmup_steps=0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_length=512,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return config_class(**settings)


def dataset(rows, stage):
    from datasets import Dataset

    from trainers.data import validate_row

    return Dataset.from_list([validate_row(row, stage) for row in rows])


def joint_rows():
    return [{**row, "docs": row["docs"] + [row["docs"][1]], "pos_index": [0]} for row in instruct_rows()]


def snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def changed_parameters(model, before):
    return {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}


def component_parameters(model, *components):
    """Parameter names of the given components (adapters by name, or "added_token_embeddings")."""
    names = set()
    for name, _ in model.named_parameters():
        for component in components:
            if component == "added_token_embeddings" and name.startswith("added_token_embeddings"):
                names.add(name)
            elif component != "added_token_embeddings" and f".{model.adapter_names[component]}." in name:
                names.add(name)
    return names


REMOTE_CODE_SCRIPT = """
import json, sys
sys.modules["modeling_clara"] = None  # the package must not be importable in this process
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

directory, expected_path = sys.argv[1], sys.argv[2]
expected = load_file(expected_path)
documents, question = json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = AutoModel.from_pretrained(directory, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert torch.equal(model.compress_documents(documents), expected["documents"])
assert torch.equal(model.encode_queries([question]), expected["queries"])
answers = model.answer([question], [documents], k=1, max_new_tokens=4)
processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
assert processor.memory_token_ids == model.config.memory_token_ids
print("REMOTE-OK", type(model).__name__, type(processor).__name__, json.dumps(answers))
"""


def assert_loads_as_remote_code(directory, model, work_dir) -> None:
    """`directory` loads with `AutoModel.from_pretrained(..., trust_remote_code=True)` in a clean, offline process
    where this package cannot be imported, and gives `model`'s memories, query memories and answers exactly."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    documents, question = DOCUMENTS[:2], "Where is it?"
    expected_path = work_dir / "expected.safetensors"
    save_file({"documents": model.compress_documents(documents), "queries": model.encode_queries([question])}, expected_path)
    expected_answers = model.answer([question], [documents], k=1, max_new_tokens=4)
    home = work_dir / "hf_home"
    home.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(directory), str(expected_path), json.dumps(documents), json.dumps(question)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        cwd=home,  # not the project root, whose packages would be importable
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"REMOTE-OK ClaraForRAG ClaraProcessor {json.dumps(expected_answers)}" in result.stdout


# ---------------------------------------------------------------- dictd databases (data_synthesis.prose)
BASE64_DIGITS = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"


def dictd_number(value: int) -> str:
    """A number as dictd's index writes it: base64 digits, most significant first, no padding."""
    digits = BASE64_DIGITS[value % 64]
    while value := value // 64:
        digits = BASE64_DIGITS[value % 64] + digits
    return digits


def write_dictd(folder: Path, name: str, entries: list[tuple[list[str], str]], compress: bool = True) -> Path:
    """A dictd database `name` in `folder`: each entry's text, indexed under each of its headwords in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    data, index = b"", []
    for headwords, text in entries:
        encoded = text.encode()
        index += [f"{headword}\t{dictd_number(len(data))}\t{dictd_number(len(encoded))}\n" for headword in headwords]
        data += encoded
    (folder / f"{name}.index").write_text("".join(index))
    if compress:  # dictzip's .dz is gzip with a seek table in its header, which gzip readers skip
        (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    else:
        (folder / f"{name}.dict").write_bytes(data)
    return folder


class HostReads(TorchDispatchMode):
    """Records, while `recording`, each operation that reads a tensor's values on the host, which on a GPU makes the
    host wait for the device (a sync): scalar reads (`.item()`, `bool()`, `int()`), results shaped by the data
    (`nonzero`, boolean-mask indexing, `masked_select`), `torch.equal`, and tensors made from host data
    (`torch.tensor(..., device=...)`, a blocking copy to a GPU). Left out: the data loader's work (host tensors by
    design), `_require`'s checks (device-side asserts in training on a GPU) and transformers' mask creation, which
    reads the padding mask to decide whether attention may skip it (one read per decoder call, not ours to change).
    `sites`: `"operation at file:line (function)"` of the innermost frame outside torch, one per read."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "lift_fresh", "lift_fresh_copy", "_unique2"}
    EXEMPT = ("torch/utils/data/", "transformers/masking_utils.py")

    def __init__(self):
        super().__init__()
        self.recording = False
        self.sites = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        mask_indexing = name in ("index", "index_put", "index_put_") and any(
            index is not None and index.dtype == torch.bool for index in args[1]
        )
        if self.recording and (name in self.READS or mask_indexing):
            frames = traceback.extract_stack()[:-1]
            exempt = any(e in f.filename for f in frames for e in self.EXEMPT) or any(f.name == "_require" for f in frames)
            if not exempt:
                outside_torch = [f for f in frames if "/torch/" not in f.filename]
                site = outside_torch[-1]
                self.sites.append(f"{name} at {Path(site.filename).name}:{site.lineno} ({site.name})")
        return func(*args, **(kwargs or {}))
