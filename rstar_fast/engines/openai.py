"""OpenAI-compatible server backend (`openai:URL#MODEL`): vLLM, SGLang, trtllm-serve, serve.py.

    policy = load_policy("openai:http://127.0.0.1:8000#my-model,tokenizer=/models/my-model,timeout=600")

Spec: `openai:URL#MODEL[,key=value,...]`. The options follow the model name after commas (a
URL ends at '#', and model names hold no commas: Hugging Face ids cannot); a folder holding one
cannot be named in the spec, pass it as a keyword option instead. Keys, also accepted as
keyword options (the spec wins over an option): `tokenizer` (the model's tokenizer folder,
needed unless MODEL is a local folder: prompts are token ids), `timeout` (seconds), `max_retries`,
`max_in_flight`, `max_model_len` (the server's context), `vllm_extensions` (true/false),
`split_n` (true/false) and `api_key_env`. The API key is read from the environment, never from the spec (which shows in
logs, shell history and process lists): from `OPENAI_API_KEY` when it is set, or from the
variable that `api_key_env=NAME` names, which must be set.

Talks to `POST {URL}/v1/completions` (a URL that already ends in `/v1` is used as is) with the
prompt as a list of token ids, `n`, `stop`, `seed` and the sampling knobs; `top_k` is sent only
when set. Concurrent calls go out concurrently (the server batches them), at most
`max_in_flight` at a time.

The stop string is kept at the end of the text. Servers drop it by default; we ask vLLM and
trtllm-serve to keep it (`include_stop_str_in_output`, and `skip_special_tokens: false` with
`spaces_between_special_tokens: false` so special step markers survive as written; turn them
off with `vllm_extensions=False`; SGLang honours `skip_special_tokens` and ignores the other two,
so there too special markers are lost without them). If a server still drops it, the stop
named in the choice's `stop_reason` (vLLM, trtllm-serve) or `matched_stop` (SGLang) is
appended again; a server that reports neither cannot be told apart from EOS, and the completion
then reads as an EOS stop. Text after a stop string, if any server returns some, is cut. An EOS
stop's text is left without the EOS token's text, which vLLM v1 appends when special tokens are
kept (as the other engines leave EOS out).
`token_ids` are the text re-encoded with the policy's tokenizer (servers do not all return ids),
so they decode to the text exactly.

Context: vLLM refuses (400) a request whose prompt plus max_tokens exceeds the model's context.
When the context is known, from the `max_model_len` option or else from the `max_model_len`
that `GET {URL}/v1/models` reports for MODEL, or for the model a LoRA adapter MODEL is the
`parent` of (vLLM, SGLang and serve.py report it; trtllm-serve does not: give it
`max_model_len=N` there; asked until the server
answers: again on the next call when it is not up yet, at most every `CONTEXT_RETRY_S` seconds
after a 429, a 5xx or no answer in time), max_tokens is
cut to what the prompt leaves less `CONTEXT_RESERVE` (6) tokens, and a prompt that leaves no
more gets empty completions (finish_reason "length") without a request: the search reads them
as unparsable steps that end the branch. The reserve is SGLang's: it refuses a request whose
prompt plus max_tokens reaches its context, and a prompt within 6 tokens of it. Under
speculative decoding SGLang keeps more back; give it a smaller `max_model_len` then.

Greedy requests (temperature 0) for n > 1 samples go out as one sample, copied n times: the
samples are alike, and vLLM and trtllm-serve refuse greedy n > 1.

Seeds: with `seed` and n > 1, vLLM seeds the request's i-th sample seed + i. SGLang honours a
seed only under `--enable-deterministic-inference`, and then its n samples share it and come back
alike: `split_n=true` sends n requests of one sample each, seeded seed + i, as vLLM seeds them
(the server's prefix cache shares their prompt).

Failures: 429, 5xx and dropped or refused connections are retried with exponential backoff
(a `Retry-After` in seconds is honoured, up to two minutes), up to `max_retries`; then
EngineUnavailableError (connection) or EngineError (status). `timeout` bounds each whole
answer, however slowly its bytes arrive. A timeout, another 4xx, or an answer that is not the
expected JSON raises EngineError at once, naming the URL; so does any other failure of the
HTTP client (an answer that does not decode, say). A bad port or an API key that cannot go in an
HTTP header (a stray newline, a non-ASCII character) is refused when the engine is made.

Event loops: the engine keeps one HTTP client, for the event loop it last ran on (each
asyncio.run is a new one). A client is closed by close(), or by the shutdown of its loop
(asyncio.run finalizes async generators before it closes the loop, and an async generator holds
each client), or at once when the engine moves on while that loop still runs in another thread;
so none is left open for the garbage collector to warn about.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import re
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

from rstar_fast.aio import gather_all
from rstar_fast.engines.base import (
    BusyClock,
    Completion,
    EngineError,
    EngineSpecError,
    EngineStats,
    EngineUnavailableError,
    PolicyEngine,
    SamplingParams,
    Tokenizer,
    parse_bool,
    serving_loop,
    spec_items,
)
from rstar_fast.engines.stops import HFTokenizer, StopMatcher, finished_text

try:
    import httpx
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise EngineUnavailableError("the openai engine needs httpx: pip install 'rstar-fast[openai]'") from _exc

MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer pause is not waited on longer
CONTEXT_RETRY_S = 30.0  # after a failed /v1/models question, calls this soon after go without asking
# tokens of the context no request reaches: SGLang refuses a prompt plus max_tokens that reaches its
# context, and a prompt within 6 tokens of it (its max_req_input_len)
CONTEXT_RESERVE = 6
# what a 400 for a prompt past the context says: vLLM, SGLang ("maximum context length"), trtllm-serve
_CONTEXT_ERROR = re.compile(r"context length|max_seq_len|max_num_tokens")


# spec keys (`openai:URL#MODEL,key=value,...`) and how to read their values
_SPEC_KEYS: dict[str, Any] = {
    "tokenizer": str,
    "timeout": float,
    "max_retries": int,
    "max_in_flight": int,
    "max_model_len": int,
    "vllm_extensions": parse_bool,
    "split_n": parse_bool,
    "api_key_env": str,
}


def _spec_options(spec: str, items: str) -> dict[str, Any]:
    """The `key=value` items after the model name, typed; EngineSpecError names a bad one."""
    if any(item.split("=")[0].strip() == "api_key" for item in items.split(",")):
        raise EngineSpecError(
            f"openai: spec {spec!r} holds an API key; keys never go in a spec (specs show in logs, "
            "shell history and process lists): export OPENAI_API_KEY, or name another variable with "
            "api_key_env=NAME"
        )
    return spec_items(items, _SPEC_KEYS, f"openai: spec {spec!r} (options follow the model name after commas)")


def _auth_headers(api_key_env: str | None) -> dict[str, str]:
    """The Authorization header from OPENAI_API_KEY, or from the variable named (which must be set)."""
    name = api_key_env or "OPENAI_API_KEY"
    key = os.environ.get(name)
    if api_key_env and not key:
        raise EngineSpecError(f"openai: api_key_env={api_key_env} names an environment variable that is not set")
    if key and not re.fullmatch(r"[\x21-\x7e]+", key):  # the key itself is never shown: it is a secret
        raise EngineSpecError(
            f"openai: the API key in {name} holds whitespace or a non-ASCII character, which cannot go in "
            f"an HTTP header (a trailing newline from a key file?): set {name} to the key alone"
        )
    return {"Authorization": f"Bearer {key}"} if key else {}


def _certificate_refused(exc: BaseException) -> bool:
    """Whether a connection failed because the server's TLS certificate did not verify."""
    import ssl

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _listed_context(resp: httpx.Response, model: str) -> int | None:
    """The max_model_len that a /v1/models answer gives for `model`, if any."""
    try:
        listed = resp.json()["data"] if resp.status_code == 200 else []
    except (ValueError, KeyError, TypeError):
        return None
    cards = {e.get("id"): e for e in listed if isinstance(e, dict)} if isinstance(listed, list) else {}
    card = cards.get(model)
    if isinstance(card, dict) and not isinstance(card.get("max_model_len"), int):
        card = cards.get(card.get("parent"))  # a LoRA adapter's card: its base model's says
    if isinstance(card, dict) and isinstance(card.get("max_model_len"), int):
        return int(card["max_model_len"])
    return None


async def _owning(client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    """Holds `client` open until closed itself: by the engine, or by the shutdown of the event
    loop it was first iterated on (asyncio.run finalizes async generators while its loop still
    runs), so that a client never outlives its loop unclosed."""
    try:
        yield
    finally:
        await client.aclose()


def _load_tokenizer(tokenizer: Any, model: str) -> Tokenizer:
    if tokenizer is None:
        if Path(model).expanduser().is_dir():
            return HFTokenizer.from_path(Path(model).expanduser(), "openai")
        raise EngineSpecError(
            f"openai: model {model!r} needs its tokenizer folder: add it to the spec, as in "
            f"'openai:URL#{model},tokenizer=/models/tokenizer' (prompts are token ids, so the client needs "
            "the server's tokenizer; nothing is downloaded)"
        )
    if isinstance(tokenizer, (str, Path)):
        return HFTokenizer.from_path(Path(tokenizer).expanduser(), "openai")
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    raise EngineSpecError(f"openai: tokenizer must be a folder or a Tokenizer, got {type(tokenizer).__name__}")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(text: str) -> str:
    """JSON may escape half a surrogate pair ("\\ud83d"), which no UTF-8 holds (the forest stores
    texts as UTF-8): each becomes U+FFFD, as a decoder writes a broken byte sequence."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


class OpenAIPolicy(PolicyEngine):
    """A policy behind an OpenAI-compatible `/v1/completions` endpoint."""

    def __init__(
        self,
        url: str,
        model: str,
        tokenizer: Any = None,
        max_in_flight: int = 64,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_model_len: int | None = None,
        api_key_env: str | None = None,
        vllm_extensions: bool = True,
        split_n: bool = False,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise EngineSpecError(f"openai: URL must start with http:// or https://, got {url!r}")
        if not model:
            raise EngineSpecError(f"openai: spec needs a model name after '#', as in 'openai:{url}#my-model'")
        bad = [f"{name}={value}" for name, value, ok in (
            ("timeout", timeout, timeout > 0),
            ("connect_timeout", connect_timeout, connect_timeout > 0),
            ("max_retries", max_retries, max_retries >= 0),
            ("max_in_flight", max_in_flight, max_in_flight >= 1),
            ("max_model_len", max_model_len, max_model_len is None or max_model_len >= 1),
        ) if not ok]
        if bad:
            raise EngineSpecError(
                f"openai: bad option {bad[0]} for {url}: timeouts must be > 0, max_retries >= 0, "
                "max_in_flight and max_model_len >= 1"
            )
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.endpoint = self.base + "/completions"
        try:
            port = httpx.URL(self.endpoint).port
        except httpx.InvalidURL as exc:
            raise EngineSpecError(f"openai: bad URL {url!r}: {exc}") from None
        if port is not None and not 0 < port <= 65535:
            raise EngineSpecError(f"openai: bad URL {url!r}: port {port} is not in 1-65535")
        self.model = model
        self.tokenizer = _load_tokenizer(tokenizer, model)
        # the end-of-sequence texts a server may leave in a completion (a tokenizer of one's own
        # need not name any)
        eos_ids = getattr(self.tokenizer, "eos_token_ids", None) or {
            i for i in (getattr(self.tokenizer, "eos_token_id", None),) if isinstance(i, int)}
        self._eos_texts = tuple(t for t in (self.tokenizer.decode([i]) for i in sorted(eos_ids)) if t)
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_model_len = max_model_len
        self._context_known = max_model_len is not None  # else /v1/models is asked
        self._ask_again_at = 0.0  # time.monotonic() before which /v1/models is not asked again
        self.headers = _auth_headers(api_key_env)
        self.vllm_extensions = vllm_extensions
        self.split_n = split_n
        self.extra_body = dict(extra_body or {})
        self.stats = EngineStats()
        self.retries = 0  # how many requests were sent again (429, 5xx, dropped connections)
        self._clock = BusyClock(self.stats)
        self._client: httpx.AsyncClient | None = None
        self._owner: AsyncGenerator[None, None] | None = None  # holds _client open (see `_owning`)
        self._sem: asyncio.Semaphore | None = None
        self._ask_lock: asyncio.Lock | None = None  # one /v1/models question at a time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests = 0  # posts in flight, on self._loop
        self._closed = False
        self._closing: asyncio.Event | None = None  # set by close(): ends a wait before a retry

    @classmethod
    def from_spec(cls, rest: str, **options: Any) -> OpenAIPolicy:
        url, sep, tail = rest.partition("#")
        if not sep:
            raise EngineSpecError(
                f"openai: spec {rest!r} needs the form URL#MODEL, e.g. http://127.0.0.1:8000#my-model"
            )
        model, _, items = tail.partition(",")
        return cls(url, model.strip(), **{**options, **_spec_options(rest, items)})

    async def _session(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """The HTTP client and the in-flight bound of the running event loop."""
        if self._closed:
            raise self._closed_error()
        loop = serving_loop("openai", self._loop, self._requests > 0)
        if self._client is None or self._loop is not loop:
            self._release()
            self._loop = loop
            limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits, headers=self.headers)
            self._sem = asyncio.Semaphore(self.max_in_flight)
            self._closing = asyncio.Event()
            self._ask_lock = asyncio.Lock()
            self._owner = _owning(self._client)
            await anext(self._owner)  # runs to its `yield` at once: no other call sees a half-made session
        assert self._client is not None and self._sem is not None
        return self._client, self._sem

    def _closed_error(self) -> EngineError:
        return EngineError(f"openai: engine for {self.endpoint} is closed")

    async def _pause(self, seconds: float) -> None:
        """The wait before a retry, which close() ends at once."""
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return
        raise self._closed_error()

    def _release(self) -> None:
        """Let go of the client of the event loop used before: closed now if that loop runs in
        another thread; else closed already, or when that loop shuts down, by its `_owning`."""
        owner, loop = self._owner, self._loop
        self._client = self._owner = None
        if owner is not None and loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(owner.aclose(), loop)

    async def _context(self) -> int | None:
        """The server's context in tokens: the max_model_len option, else what /v1/models reports."""
        if self._context_known or time.monotonic() < self._ask_again_at:
            return self.max_model_len
        client, _ = await self._session()
        with self._in_flight():
            return await self._ask_context(client)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Counts a call that uses the session's client: another loop's call must not close it."""
        self._requests += 1
        try:
            yield
        finally:
            self._requests -= 1

    async def _ask_context(self, client: httpx.AsyncClient) -> int | None:
        assert self._ask_lock is not None
        async with self._ask_lock:
            if self._context_known or time.monotonic() < self._ask_again_at:  # asked while we waited
                return self.max_model_len
            try:
                async with asyncio.timeout(self.timeout.connect):  # any server lists its models at once
                    resp = await client.get(self.base + "/models")
            except httpx.ConnectError:
                return None  # not up yet: the request itself will say so; ask again next time
            except Exception:  # noqa: BLE001 - no answer in time, or none usable: the request reports it
                resp = None
            if resp is None or resp.status_code == 429 or resp.status_code >= 500:
                # a passing failure: ask again on a later call, but not on every call meanwhile
                self._ask_again_at = time.monotonic() + CONTEXT_RETRY_S
                return None
            self.max_model_len = _listed_context(resp, self.model)  # None: the server does not say
            self._context_known = True
        return self.max_model_len

    def _body(self, prompt: list[int], params: SamplingParams, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "n": params.n,
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if self.vllm_extensions:
            body["include_stop_str_in_output"] = True
            body["skip_special_tokens"] = False
            body["spaces_between_special_tokens"] = False
        body.update(self.extra_body)
        return body

    async def _post(self, body: dict[str, Any]) -> Any:
        client, sem = await self._session()
        with self._in_flight():
            return await self._post_on(client, sem, body)

    async def _post_on(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, body: dict[str, Any]) -> Any:
        last: EngineError | None = None
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * 2**attempt) * (0.75 + 0.5 * random.random())
            try:
                try:
                    async with sem, asyncio.timeout(self.timeout_s):  # httpx bounds each read, not the whole
                        resp = await client.post(self.endpoint, json=body)
                except Exception as exc:
                    if self._closed:  # close() took the client away mid-request
                        raise self._closed_error() from exc
                    raise
            except EngineError:
                raise
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if _certificate_refused(exc):  # a setting to fix, not a server still starting
                    raise EngineError(f"openai: {self.endpoint}: the server's TLS certificate failed "
                                      f"verification: {exc}") from exc
                last = EngineUnavailableError(f"openai: cannot reach {self.endpoint}: {exc!r}")
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                last = EngineUnavailableError(f"openai: connection to {self.endpoint} dropped mid-request: {exc!r}")
            except (httpx.TimeoutException, TimeoutError) as exc:
                raise EngineError(
                    f"openai: {self.endpoint} did not answer within {self.timeout_s} s (raise timeout=S in the spec)"
                ) from exc
            except Exception as exc:  # noqa: BLE001 - an answer that does not decode, say: named, not raw
                raise EngineError(f"openai: request to {self.endpoint} failed: {exc!r}") from exc
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = EngineError(f"openai: {self.endpoint} answered HTTP {resp.status_code}: {resp.text[:300]}")
                    try:
                        wait = min(MAX_RETRY_AFTER_S, max(wait, float(resp.headers.get("retry-after", 0))))
                    except ValueError:  # an HTTP date: keep the backoff
                        pass
                elif resp.status_code >= 400:
                    hint = ""
                    if _CONTEXT_ERROR.search(resp.text) and self.max_model_len is None:
                        hint = " (tell the engine the server's context, max_model_len=N in the spec)"
                    elif _CONTEXT_ERROR.search(resp.text):  # the context is known: the server keeps more back
                        hint = (f" (requests stop {CONTEXT_RESERVE} tokens short of the context, {self.max_model_len}; "
                                "this server keeps more of it back, as SGLang does under speculative decoding: "
                                "give a smaller max_model_len=N in the spec)")
                    raise EngineError(
                        f"openai: {self.endpoint} answered HTTP {resp.status_code}: {resp.text[:500]}{hint}"
                    )
                else:
                    try:
                        return resp.json()
                    except ValueError as exc:
                        raise EngineError(
                            f"openai: {self.endpoint} answered something that is not JSON: {resp.text[:200]!r}"
                        ) from exc
            if attempt < self.max_retries:
                self.retries += 1
                await self._pause(wait)
        assert last is not None
        raise last

    def _completion(self, choice: Any, params: SamplingParams, matcher: StopMatcher) -> Completion:
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
            raise EngineError(f"openai: {self.endpoint}: a choice without text: {str(choice)[:200]}")
        text: str = _valid_text(choice["text"])
        reason = choice.get("finish_reason")
        said_stop = next((choice[k] for k in ("stop_reason", "matched_stop") if choice.get(k) is not None), None)
        text, finish, stop = finished_text(text, reason, said_stop, params.stop, matcher, f"openai: {self.endpoint}")
        if finish == "stop" and stop is None:  # EOS: without its text, which vLLM keeps with skip_special_tokens false
            eos = next((t for t in self._eos_texts if text.endswith(t)), "")
            text = text[: len(text) - len(eos)]
        return Completion(text, self.tokenizer.encode(text), finish, stop)

    def _choices(self, data: Any, n: int) -> list[Any]:
        """An answer's n choices, in index order."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise EngineError(f"openai: {self.endpoint} answered with {got} choices for n={n}: {str(data)[:200]}")
        if all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        return choices

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[Completion]:
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise EngineError("openai: empty prompt")
        context = await self._context()
        room = params.max_tokens if context is None else context - len(prompt) - CONTEXT_RESERVE
        if room <= 0:
            return [Completion("", [], "length", None) for _ in range(params.n)]
        max_tokens = min(params.max_tokens, room)
        asked = params.n
        if params.greedy and asked > 1:  # alike anyway, and vLLM and trtllm-serve refuse greedy n > 1
            params = dataclasses.replace(params, n=1)
        with self._clock:
            if self.split_n and params.n > 1:
                ones = [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                        for i in range(params.n)]
                answers = await gather_all(*(self._post(self._body(prompt, one, max_tokens)) for one in ones))
                choices = [c for data in answers for c in self._choices(data, 1)]
            else:
                choices = self._choices(await self._post(self._body(prompt, params, max_tokens)), params.n)
        matcher = StopMatcher(params.stop)
        out = [self._completion(c, params, matcher) for c in choices]
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.generated_tokens += sum(len(c.token_ids) for c in out)
        return out if asked == params.n else [dataclasses.replace(out[0], token_ids=list(out[0].token_ids)) for _ in range(asked)]

    async def close(self) -> None:
        self._closed = True
        closing, loop = self._closing, self._loop
        if closing is not None and loop is not None:  # requests waiting to retry end now
            if loop is asyncio.get_running_loop():
                closing.set()
            elif loop.is_running():
                loop.call_soon_threadsafe(closing.set)
        owner = self._owner
        if owner is not None and self._loop is asyncio.get_running_loop():
            self._client = self._owner = None
            await owner.aclose()
        self._release()
