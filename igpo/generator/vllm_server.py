"""vLLM server generator: the same token-in, token-out contract as `VLLMGenerator`, over HTTP.

The inference side of a larger deployment: one or more separately started OpenAI-compatible vLLM servers
(`python -m vllm.entrypoints.openai.api_server ...`, one per node or tensor parallel; docs/scaling.md).
Each prompt is one `POST /v1/completions` with a token-id prompt, sent concurrently (the server batches
them), to a server chosen by `routing`. Every HTTP call has a timeout and bounded, exponentially backed
off retries; a server that stays unreachable raises `ServerError` naming the URL and what to check.

LoRA versions are served through vLLM's runtime adapter loading (`set_lora`, used by
`igpo.generator.sync.ServerAdapterSync`): the servers must run with `--enable-lora --max-lora-rank R
--max-loras 2` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, and see the adapter directory (same node or a
shared filesystem). Start them with `--logprobs-mode processed_logprobs` so the returned log-probs are the
sampler's, as the in-process engine's are.
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from igpo.generator.base import Generation, SamplingConfig, check_prompts, split_stops

Routing = Literal["round_robin", "prefix"]
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
HINT = ("check that the server is running and reachable from this machine (`curl {url}/health`), that the "
        "URL and port are right, and the end of the server's log (out of memory, crash)")


class ServerError(RuntimeError):
    """A vLLM server did not answer (after the retries) or refused a request."""


class VLLMServerGenerator:
    """A `Generator` backed by separately started vLLM servers (OpenAI-compatible HTTP API).

    Semantics equal `VLLMGenerator`'s: token-id prompts in; sampled ids, the sampler's log-prob of each,
    text decoded from those ids and the finish reason out; stop strings that are single added tokens go
    as `stop_token_ids`; with `sampling.seed = s` prompt i is sampled with seed `s + i` (identical seeds
    give identical samples on any of the servers, which must serve the same weights).

    urls: one or several server base URLs (`http://host:port`). routing: `round_robin` spreads requests
    evenly; `prefix` sends a request to the server chosen by a hash of its first `prefix_tokens` prompt
    tokens, so contexts that share that prefix (the G copies of a question, their later turns) hit one
    server's prefix cache; set `prefix_tokens` to cover the system prompt and the question.
    model: the served base model name; None asks the first server (`GET /v1/models`).
    timeout_s: read timeout of one HTTP call (a long generation on a busy CPU server takes minutes);
    retries/backoff_s/max_backoff_s: a call is retried `retries` times after connection errors, timeouts
    and HTTP 429/5xx, waiting backoff_s·2^k (at most max_backoff_s) in between.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        tokenizer: str,
        *,
        model: str | None = None,
        routing: Routing = "round_robin",
        prefix_tokens: int = 256,
        max_concurrency: int = 64,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        health_timeout_s: float = 120.0,
        stop_ids_for_tokens: bool = True,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in self.urls):
            raise ValueError(f"VLLMServerGenerator: urls must be http(s):// base URLs, got {urls!r}")
        self.urls = [u.rstrip("/") for u in self.urls]
        if routing not in ("round_robin", "prefix"):
            raise ValueError(f"VLLMServerGenerator: routing must be 'round_robin' or 'prefix', got {routing!r}")
        if retries < 0 or max_concurrency < 1 or prefix_tokens < 1:
            raise ValueError("VLLMServerGenerator: retries >= 0, max_concurrency >= 1, prefix_tokens >= 1")
        self.tokenizer_path, self.model = str(tokenizer), model
        self.routing, self.prefix_tokens, self.max_concurrency = routing, prefix_tokens, max_concurrency
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.health_timeout_s = health_timeout_s
        self.stop_ids_for_tokens = stop_ids_for_tokens
        self.tokenizer: Any = None
        self.lora_name: str | None = None  # the adapter generate/score use after set_lora
        self.startup_seconds = 0.0
        self._session: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._next = 0
        self._lock = threading.Lock()
        self._run = uuid.uuid4().hex[:8]  # adapter names are unique per generator instance

    # ---- lifecycle -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Open the HTTP session, wait for every server's `/health` (bounded), find the served model name
        and load the tokenizer (idempotent)."""
        if self._session is not None:
            return
        import requests
        from requests.adapters import HTTPAdapter
        from transformers import AutoTokenizer

        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=len(self.urls), pool_maxsize=self.max_concurrency, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session
        start = time.perf_counter()
        try:
            for url in self.urls:
                self._wait_healthy(url)
            if self.model is None:
                self.model = self._served_model(self.urls[0])
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        except BaseException:
            self._session = None
            session.close()
            raise
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="vllm-http")
        self.startup_seconds = time.perf_counter() - start

    def close(self) -> None:
        """Unload this run's adapter from the servers (best effort, one try) and release the session."""
        if self._session is None:
            return
        if self.lora_name is not None:
            for url in self.urls:
                try:
                    self._post(url, "/v1/unload_lora_adapter", {"lora_name": self.lora_name}, retries=0,
                               timeout=(self.connect_timeout_s, 10.0))
                except ServerError:
                    pass
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._session.close()
        self._session = self._pool = self.tokenizer = self.lora_name = None

    def __enter__(self) -> VLLMServerGenerator:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- sampling --------------------------------------------------------------------------------
    def request_body(self, prompt: list[int], sampling: SamplingConfig, seed: int | None) -> dict[str, Any]:
        """The `/v1/completions` body for one prompt (vLLM's extensions: stop_token_ids, token ids out)."""
        stop_ids, stop_strings = split_stops(self._tok(), sampling.stop, self.stop_ids_for_tokens)
        body: dict[str, Any] = {
            "model": self.lora_name or self.model, "prompt": list(prompt),
            "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "top_k": max(sampling.top_k, 0),
            "stop": stop_strings, "stop_token_ids": stop_ids, "include_stop_str_in_output": True,
            "skip_special_tokens": False, "spaces_between_special_tokens": False,
            "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        """Sample one continuation per token-id prompt (prompt i with seed `sampling.seed + i`)."""
        check_prompts(prompts, "VLLMServerGenerator.generate")
        seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]
        bodies = [self.request_body(p, sampling, s) for p, s in zip(prompts, seeds, strict=True)]
        return self._map(prompts, bodies, self._to_generation)

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of given token sequences under the served weights (position 0 = 0.0)."""
        check_prompts(sequences, "VLLMServerGenerator.score")
        bodies = [{"model": self.lora_name or self.model, "prompt": list(s), "max_tokens": 1,
                   "temperature": 1.0, "prompt_logprobs": 0} for s in sequences]

        def parse(url: str, seq: list[int], reply: dict) -> list[float]:
            steps = _choice(url, reply).get("prompt_logprobs") or [None]
            if len(steps) != len(seq):
                raise ServerError(f"{url}: prompt_logprobs has {len(steps)} entries for {len(seq)} tokens")
            return [0.0] + [float(d[str(t)]["logprob"]) for d, t in zip(steps[1:], seq[1:], strict=True)]

        return self._map(sequences, bodies, parse)

    def _to_generation(self, url: str, prompt: list[int], reply: dict) -> Generation:
        c = _choice(url, reply)
        if c.get("finish_reason") not in ("stop", "length"):
            raise ServerError(f"{url}: request ended with finish_reason {c.get('finish_reason')!r}")
        lp = c.get("logprobs") or {}
        tokens, logprobs = lp.get("tokens") or [], lp.get("token_logprobs") or []
        ids = c.get("token_ids")
        if ids is None:  # an older server without return_token_ids: parse the `token_id:N` tokens
            ids = [int(t.removeprefix("token_id:")) for t in tokens]
        if len(logprobs) != len(ids) or any(x is None for x in logprobs):
            raise ServerError(f"{url}: the reply has no per-token log-probs for {len(ids)} sampled tokens")
        text = self._tok().decode(ids, skip_special_tokens=False)
        usage = (reply.get("usage") or {}).get("prompt_tokens_details") or {}
        extra = {"stop_reason": c.get("stop_reason"), "cached_tokens": usage.get("cached_tokens") or 0,
                 "server": url}
        return Generation(list(ids), [float(x) for x in logprobs], text, c["finish_reason"], extra)

    # ---- LoRA adapters (runtime loading) -----------------------------------------------------------
    def set_lora(self, path: str, version: int) -> None:
        """Load the peft adapter at `path` on every server under a new name and generate with it from now
        on; the previous version is unloaded. A new name per version also keeps prefix-cache entries
        computed with older weights from being reused."""
        if version < 0:
            raise ValueError(f"VLLMServerGenerator.set_lora: version must be >= 0, got {version}")
        self._require_setup()
        name = f"igpo-{self._run}-v{version}"
        if name == self.lora_name:  # the same version again (a resumed run): a fresh name, same rule
            name = f"{name}-{uuid.uuid4().hex[:4]}"
        for url in self.urls:
            self._post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                       hint=("start the server with --enable-lora, --max-lora-rank >= the adapter's r and "
                             "env VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and make sure it can read {path}"))
        old, self.lora_name = self.lora_name, name
        if old is not None:
            for url in self.urls:
                self._post(url, "/v1/unload_lora_adapter", {"lora_name": old})

    def load_weights(self, named_tensors: Any) -> None:
        raise NotImplementedError(
            "VLLMServerGenerator: a vLLM server cannot take in-memory weights; train a LoRA adapter "
            "(model=lora) and use sync=server_adapter")

    # ---- HTTP --------------------------------------------------------------------------------------
    def _map(self, prompts: list[list[int]], bodies: list[dict], parse: Callable[[str, list[int], dict], Any]) -> list:
        """POST each body to its server concurrently; results in prompt order, the first error raised."""
        self._require_setup()
        urls = [self._route(p) for p in prompts]

        def one(i: int) -> Any:
            return parse(urls[i], prompts[i], self._post(urls[i], "/v1/completions", bodies[i]))

        futures = [self._pool.submit(one, i) for i in range(len(prompts))]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _route(self, prompt: list[int]) -> str:
        if len(self.urls) == 1:
            return self.urls[0]
        if self.routing == "prefix":
            key = ",".join(map(str, prompt[: self.prefix_tokens])).encode()
            return self.urls[zlib.crc32(key) % len(self.urls)]
        with self._lock:
            self._next = (self._next + 1) % len(self.urls)
            return self.urls[self._next]

    def _post(self, url: str, path: str, body: dict, *, retries: int | None = None,
              timeout: tuple[float, float] | None = None, hint: str | None = None) -> Any:
        return self._call("POST", url, path, body, retries, timeout, hint)

    def _call(self, method: str, url: str, path: str, body: dict | None, retries: int | None,
              timeout: tuple[float, float] | None, hint: str | None = None) -> Any:
        """One HTTP call with bounded retries; returns the decoded JSON (or text) of a 2xx reply."""
        import requests

        retries = self.retries if retries is None else retries
        timeout = timeout or (self.connect_timeout_s, self.timeout_s)
        start, last = time.perf_counter(), ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                r = self._session.request(method, url + path, json=body, timeout=timeout)
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {_short(e)}"
                continue
            if r.status_code < 300:
                return r.json() if "json" in r.headers.get("content-type", "") else r.text
            last = f"HTTP {r.status_code}: {_error_message(r)}"
            if r.status_code not in RETRY_STATUS:
                what = (hint or "").format(url=url, path=body.get("lora_path", "") if body else "")
                raise ServerError(f"vLLM server {url} refused {method} {path}: {last}"
                                  + (f"; {what}" if what else "")) from None
        raise ServerError(
            f"vLLM server {url} did not answer {method} {path} after {retries + 1} attempt(s) over "
            f"{time.perf_counter() - start:.1f} s (last error: {last}); {HINT.format(url=url)}") from None

    def _wait_healthy(self, url: str) -> None:
        """Poll `GET url/health` until it answers 200, at most `health_timeout_s` seconds."""
        import requests

        deadline, last = time.monotonic() + self.health_timeout_s, "no answer"
        while True:
            try:
                r = self._session.get(url + "/health", timeout=(self.connect_timeout_s, self.connect_timeout_s))
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {_short(e)}"
            if time.monotonic() >= deadline:
                raise ServerError(f"vLLM server {url} was not healthy within {self.health_timeout_s:.0f} s "
                                  f"(last: {last}); {HINT.format(url=url)}") from None
            time.sleep(1.0)

    def _served_model(self, url: str) -> str:
        data = self._call("GET", url, "/v1/models", None, None, None).get("data") or []
        bases = [m["id"] for m in data if not m.get("parent")]
        if not bases:
            raise ServerError(f"vLLM server {url}: GET /v1/models lists no base model")
        return bases[0]

    # ---- helpers ---------------------------------------------------------------------------------
    def _require_setup(self) -> None:
        if self._session is None:
            raise RuntimeError("VLLMServerGenerator: call setup() before using the servers")

    def _tok(self) -> Any:
        self._require_setup()
        return self.tokenizer


def _choice(url: str, reply: Any) -> dict:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not choices:
        raise ServerError(f"{url}: unexpected /v1/completions reply: {str(reply)[:200]}")
    return choices[0]


def _error_message(r: Any) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text[:300]
    err = data.get("error", data) if isinstance(data, dict) else data
    return str(err.get("message", err) if isinstance(err, dict) else err)[:300]


def _short(e: BaseException) -> str:
    """The innermost reason of a requests error (e.g. `[Errno 111] Connection refused`)."""
    text = str(e)
    for marker in ("Errno", "timed out", "Read timed out", "RemoteDisconnected", "Connection aborted"):
        i = text.find(marker)
        if i >= 0:
            return text[max(i - 1, 0):].split("'))")[0].split("\"))")[0][:200]
    return text[:200]
