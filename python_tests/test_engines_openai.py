"""The OpenAI-compatible client (openai:) over real HTTP on loopback.

A real server process (rstar_fast.engines.serve over the scripted tiny model) answers the
protocol tests; small aiohttp fakes play servers that throttle, fail, answer garbage, or die.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")
from aiohttp import web  # noqa: E402

from rstar_fast.engines import (  # noqa: E402
    EngineError,
    EngineSpecError,
    EngineUnavailableError,
    SamplingParams,
    load_policy,
    load_ppm,
)
from rstar_fast.engines import openai as openai_engine  # noqa: E402
from rstar_fast.engines.openai import CONTEXT_RESERVE, OpenAIPolicy  # noqa: E402
from rstar_fast.engines.tiny import build_tiny_policy  # noqa: E402
from rstar_fast.engines.tokenizer import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()


def _read_banner(proc: subprocess.Popen[str]) -> str:
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("serving"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return line.rsplit(" ", 1)[1].strip()


def _serve(folder: Path, stderr: int | IO[str] = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """serve.py in its own process on a free loopback port, serving `folder` as model "tiny"."""
    return subprocess.Popen(
        [sys.executable, "-m", "rstar_fast.engines.serve", str(folder), "--port", "0", "--device", "cpu",
         "--model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
    )


@pytest.fixture(scope="module")
def server_url(scripted_policy_path: Path) -> Iterator[str]:
    """The server over the scripted model."""
    proc = _serve(scripted_policy_path)
    try:
        yield _read_banner(proc)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _client(url: str, **kw) -> OpenAIPolicy:
    kw.setdefault("tokenizer", TOK)
    policy = load_policy(f"openai:{url}#tiny", **kw)
    assert isinstance(policy, OpenAIPolicy)
    return policy


# ---- against the real server ------------------------------------------------------------


async def test_real_server_stops_n_and_batching(server_url: str) -> None:
    policy = _client(server_url)
    (c,) = await policy.generate(TOK.encode("count: p"), SamplingParams(temperature=0, max_tokens=40, stop=("stu",)))
    assert (c.text, c.finish_reason, c.stop, c.token_ids) == ("qrstu", "stop", "stu", TOK.encode("qrstu"))
    (c,) = await policy.generate(TOK.encode("w"), SamplingParams(temperature=0, max_tokens=40, stop=("<end_of_step>",)))
    assert c.text == "xyz<end_of_step>" and c.stop == "<end_of_step>"
    (c,) = await policy.generate(TOK.encode("w"), SamplingParams(temperature=0, max_tokens=40))
    assert (c.text, c.finish_reason, c.stop) == ("xyz<end_of_step>", "stop", None)  # EOS
    (c,) = await policy.generate(TOK.encode("a"), SamplingParams(temperature=0, max_tokens=3))
    assert (c.text, c.finish_reason) == ("bcd", "length")
    out = await policy.generate(TOK.encode("j"), SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=7))
    assert [x.text for x in out] == ["klmn"] * 3
    # 16 concurrent callers all get their answer
    greedy = SamplingParams(temperature=0, max_tokens=2, top_k=1)
    outs = await asyncio.gather(*[policy.generate(TOK.encode(ch), greedy) for ch in "abcdefghijklmnop"])
    assert [o[0].text for o in outs] == [chr(ord(ch) + 1) + chr(ord(ch) + 2) for ch in "abcdefghijklmnop"]
    assert policy.retries == 0 and policy.stats.requests == 21
    await policy.close()


async def test_real_server_without_vllm_extensions_reappends_stop(server_url: str) -> None:
    # the server drops the stop string (like vLLM by default); stop_reason names it
    policy = _client(server_url, vllm_extensions=False)
    (c,) = await policy.generate(TOK.encode("p"), SamplingParams(temperature=0, max_tokens=40, stop=("stu",)))
    assert (c.text, c.stop) == ("qrstu", "stu")
    await policy.close()


async def test_real_server_rejects_bad_model_and_ids(server_url: str) -> None:
    policy = load_policy(f"openai:{server_url}#other", tokenizer=TOK, max_retries=0)
    with pytest.raises(EngineError, match="HTTP 404"):
        await policy.generate([1, 2], SamplingParams(max_tokens=2))
    await policy.close()
    policy = _client(server_url, max_retries=0)
    with pytest.raises(EngineError, match="HTTP 400"):
        await policy.generate([10**6], SamplingParams(max_tokens=2))
    await policy.close()


async def test_real_server_rejects_non_finite_numbers_alone(server_url: str) -> None:
    url = server_url + "/v1/completions"
    good = {"model": "tiny", "prompt": "abc", "max_tokens": 3, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *[client.post(url, json=good) for _ in range(3)],
            client.post(url, content=b'{"model": "tiny", "prompt": "abc", "max_tokens": 3, "temperature": NaN}'),
            client.post(url, content=b'{"model": "tiny", "prompt": "abc", "max_tokens": Infinity}'),
        )
    assert [a.status_code for a in answers] == [200, 200, 200, 400, 400]
    assert [a.json()["choices"][0]["text"] for a in answers[:3]] == ["def"] * 3
    assert "temperature" in answers[3].json()["error"]["message"]
    assert "max_tokens" in answers[4].json()["error"]["message"]


async def test_serve_fits_max_tokens_to_the_context(tmp_path: Path) -> None:
    proc = _serve(build_tiny_policy(tmp_path / "short", max_positions=20))
    try:
        url = _read_banner(proc)
        async with httpx.AsyncClient(timeout=60) as client:
            (model,) = (await client.get(url + "/v1/models")).json()["data"]
            assert model["max_model_len"] == 20  # as vLLM reports it
            body = {"model": "tiny", "prompt": "count: x", "max_tokens": 10**9, "temperature": 0}
            answer = (await client.post(url + "/v1/completions", json=body)).json()
            assert answer["usage"]["completion_tokens"] == 12 and answer["choices"][0]["finish_reason"] == "length"
            full = await client.post(url + "/v1/completions", json=dict(body, prompt="x" * 20))
            assert full.status_code == 400 and "context" in full.json()["error"]["message"]
    finally:
        proc.kill()
        proc.wait(timeout=30)


async def test_serve_puts_bos_before_a_text_prompt(tmp_path: Path) -> None:
    """As vLLM encodes a text prompt: BOS first where the tokenizer adds one (Llama-style);
    a prompt of ids is taken as it is."""
    from tokenizers import processors

    from rstar_fast.engines.tokenizer import build_hf_tokenizer

    hf = build_hf_tokenizer()
    hf.add_special_tokens({"bos_token": "<s>"})
    hf._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", hf.bos_token_id)])
    hf.save_pretrained(str(tmp_path / "tokenizer"))
    proc = _serve(build_tiny_policy(tmp_path / "bos", tokenizer=tmp_path / "tokenizer"))
    try:
        url = _read_banner(proc) + "/v1/completions"
        async with httpx.AsyncClient(timeout=60) as client:
            text = (await client.post(url, json={"model": "tiny", "prompt": "abc", "max_tokens": 1})).json()
            ids = (await client.post(url, json={"model": "tiny", "prompt": [97, 98, 99], "max_tokens": 1})).json()
        assert text["usage"]["prompt_tokens"] == 4 and ids["usage"]["prompt_tokens"] == 3
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.timeout(120)
async def test_serve_stops_abandoned_requests_and_on_ctrl_c(tmp_path: Path) -> None:
    # greedy from "x" meets no EOS on this model: a request runs until max_tokens or until stopped
    folder = build_tiny_policy(tmp_path / "long", max_positions=10**6)
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = _serve(folder, stderr=err)
    try:
        url = _read_banner(proc) + "/v1/completions"
        huge = {"model": "tiny", "prompt": "x", "max_tokens": 10**9, "temperature": 0}
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url, json=huge, timeout=1.0)
            # the request its client left stopped generating: the next one is answered at once
            small = await client.post(url, json={"model": "tiny", "prompt": "ab", "max_tokens": 2}, timeout=30)
            assert small.status_code == 200
            pending = asyncio.ensure_future(client.post(url, json=huge, timeout=60))
            # and a client still sending its body does not hold the exit (aiohttp waits 60 s)
            host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
            slow = socket.create_connection((host, int(port)))
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            await asyncio.sleep(1.0)
            stopped = time.monotonic()
            proc.send_signal(signal.SIGINT)  # Ctrl-C stops the server, request in flight or not
            rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
            assert time.monotonic() - stopped < 20
            slow.close()
            await asyncio.gather(pending, return_exceptions=True)
        assert rc == 0 and "Traceback" not in log.read_text()
    finally:
        proc.kill()
        proc.wait(timeout=30)


async def test_real_server_answers_unknown_paths_in_json(server_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        missing = await client.get(server_url + "/v2/nothing")
        wrong = await client.get(server_url + "/v1/completions")
    assert missing.status_code == 404 and "/v2/nothing" in missing.json()["error"]["message"]
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST" and wrong.json()["error"]["message"]


async def test_real_server_refuses_n_beyond_its_batch_rows(server_url: str) -> None:
    # one request runs as one batch: a huge n would stall every other client
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 1, "n": 257}  # 256 rows: the default
    async with httpx.AsyncClient(timeout=60) as client:
        resp = await client.post(server_url + "/v1/completions", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and "n=257" in error["message"]
    assert "256" in error["message"] and "--max-batch-rows" in error["message"]


async def test_real_server_refuses_what_would_stall_or_crash_it(server_url: str) -> None:
    """A client's mistake is a JSON 400 (which the openai: client does not retry), never a 500
    or a stall for the other clients."""
    url = server_url + "/v1/completions"
    base = {"model": "tiny", "prompt": "ab", "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:
        cases = [
            (json.dumps({**base, "stop": ["x"] * 65}), "at most 64"),
            (json.dumps({**base, "stop": ["\udc80"]}), "lone surrogate"),
            (json.dumps({**base, "stop": [None]}), "list of strings"),
            ("[" * 100_000, "nested too deeply"),
        ]
        for body, message in cases:
            resp = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            assert resp.status_code == 400 and message in resp.json()["error"]["message"], (message, resp.text)
        resp = await client.post(url, content=b" " * (9 << 20), headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]
        # a top_k past the vocabulary cuts nothing (it overflowed the sampler before)
        resp = await client.post(url, json={**base, "top_k": 2**63})
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "c"
        # numbers are numbers: no bool, string or fractional count slips through as one
        for extra in ({"n": True}, {"n": "3"}, {"n": 2.5}, {"seed": 1.5}, {"top_p": "0.5"},
                      {"include_stop_str_in_output": "false"}):
            resp = await client.post(url, json={**base, **extra})
            assert resp.status_code == 400 and next(iter(extra)) in resp.json()["error"]["message"], extra
        # null is the default, as OpenAI and vLLM read it
        resp = await client.post(url, json={**base, "n": None, "top_p": None, "seed": None})
        assert resp.status_code == 200 and len(resp.json()["choices"]) == 1
        health = await client.get(server_url + "/health")
        model = (await client.get(server_url + "/v1/models")).json()["data"][0]
        assert health.status_code == 200 and model["owned_by"] and isinstance(model["created"], int)


async def test_real_server_refuses_what_it_does_not_support(server_url: str) -> None:
    url = server_url + "/v1/completions"
    base = {"model": "tiny", "prompt": "ab", "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:
        for extra, name in [({"stream": True}, "stream"), ({"echo": True}, "echo"), ({"logprobs": 0}, "logprobs"),
                            ({"best_of": 2}, "best_of"), ({"presence_penalty": 0.5}, "presence_penalty"),
                            ({"logit_bias": {"5": 10}}, "logit_bias"), ({"ignore_eos": True}, "ignore_eos")]:
            resp = await client.post(url, json={**base, **extra})
            assert resp.status_code == 400, extra
            error = resp.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"].startswith(name)
            assert "not supported" in error["message"]
        # a field it does not read is refused too, not ignored: it would change what the client gets
        for extra, name in [({"use_beam_search": True}, "use_beam_search"), ({"guided_regex": "a+"}, "guided_regex"),
                            ({"skip_special_tokens": True}, "skip_special_tokens")]:
            resp = await client.post(url, json={**base, **extra})
            assert resp.status_code == 400 and resp.json()["error"]["message"].startswith(name), extra
        # what these fields say by default is what the server does
        fine = {"stream": False, "echo": False, "logprobs": None, "best_of": 1, "presence_penalty": 0,
                "frequency_penalty": 0.0, "logit_bias": {}, "repetition_penalty": 1.0, "skip_special_tokens": False,
                "spaces_between_special_tokens": False, "user": "someone"}
        resp = await client.post(url, json={**base, **fine})
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "c"
        # a charset Python does not know is the client's mistake, said in JSON
        resp = await client.post(url, content=json.dumps(base),
                                 headers={"Content-Type": "application/json; charset=nope"})
        assert resp.status_code == 400 and "charset 'nope'" in resp.json()["error"]["message"]


def _stub_policy(generate: Any) -> Any:
    """What serve uses of an HFPolicy, with `generate` as its generate."""
    stub = SimpleNamespace(tokenizer=TOK, vocab_size=TOK.vocab_size, max_model_len=None, max_batch_rows=4)
    stub.generate = generate
    return stub


async def test_serve_usage_counts_the_tokens_sampled_when_a_stop_ends_inside_one() -> None:
    """The completion's ids are the text re-encoded up to the stop, which can be more tokens
    than were sampled; usage counts what was sampled, as vLLM does, never past max_tokens."""
    from aiohttp.test_utils import TestClient, TestServer

    from rstar_fast.engines.base import Completion
    from rstar_fast.engines.serve import build_app

    async def cut(ids: list[int], params: SamplingParams) -> list:  # one token "<end>" sampled, cut at "<e"
        return [Completion("<e", TOK.encode("<e"), "stop", "<e", sampled=1)]

    async with TestClient(TestServer(build_app(_stub_policy(cut), "tiny"))) as client:
        resp = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1, "stop": ["<e"]})
        assert (await resp.json())["usage"]["completion_tokens"] == 1


async def test_serve_refuses_a_prompt_too_long_before_scanning_its_ids() -> None:
    """The length costs nothing; the scans of every id cost ~40 ms for a million of them, on the
    event loop every client shares."""
    from aiohttp.test_utils import TestClient, TestServer

    from rstar_fast.engines import serve

    stub = _stub_policy(None)
    stub.max_model_len = 8
    async with TestClient(TestServer(serve.build_app(stub, "tiny"))) as client:
        resp = await client.post("/v1/completions", json={"prompt": [1] * 8 + ["x"]})
        assert resp.status == 400 and "the prompt has 9 tokens" in (await resp.json())["error"]["message"]


async def test_serve_answers_its_own_bugs_in_json() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from rstar_fast.engines.serve import build_app

    async def broken(ids: list[int], params: SamplingParams) -> list:
        raise RuntimeError("a bug")

    async with TestClient(TestServer(build_app(_stub_policy(broken), "tiny"))) as client:
        resp = await client.post("/v1/completions", json={"prompt": "ab"})
        assert resp.status == 500
        assert (await resp.json())["error"]["message"] == "POST /v1/completions: RuntimeError: a bug"


async def test_serve_labels_its_own_failures_server_error() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from rstar_fast.engines.serve import build_app

    async def failing(ids: list[int], params: SamplingParams) -> list:  # as a model out of memory does
        raise EngineError("hf-policy:tiny: out of memory")

    async with TestClient(TestServer(build_app(_stub_policy(failing), "tiny"))) as client:
        resp = await client.post("/v1/completions", json={"prompt": "ab"})
        assert resp.status == 500
        assert (await resp.json())["error"] == {"message": "hf-policy:tiny: out of memory", "type": "server_error"}
        resp = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 0})
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"


def test_serve_command_startup_errors_are_one_line(tiny_policy_path: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from rstar_fast.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2  # a spec error, as usage errors
    err = capsys.readouterr().err
    assert err.startswith("rstar-fast serve: error: hf: policy folder") and err.count("\n") == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_policy_path), "--port", str(port), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rstar-fast serve: error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1
    for flag, value in (("--port", "70000"), ("--max-batch-rows", "0"), ("--max-batch-rows", "-2")):
        with pytest.raises(SystemExit) as exit_:  # a usage error, before any model loads
            main(["serve", str(tiny_policy_path), flag, value, "--device", "cpu"])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err


# ---- specs -------------------------------------------------------------------------------


def test_bad_specs(tiny_policy_path: Path) -> None:
    with pytest.raises(EngineSpecError, match="URL#MODEL"):
        load_policy("openai:http://127.0.0.1:1")
    with pytest.raises(EngineSpecError, match="http"):
        load_policy("openai:127.0.0.1:1#m", tokenizer=TOK)
    with pytest.raises(EngineSpecError, match="model name"):
        load_policy("openai:http://127.0.0.1:1#", tokenizer=TOK)
    with pytest.raises(EngineSpecError, match="tokenizer"):
        load_policy("openai:http://127.0.0.1:1#Qwen/Qwen2.5-Math-7B")
    with pytest.raises(EngineSpecError, match="cannot serve as a PPM"):
        load_ppm("openai:http://127.0.0.1:1#m")
    for url, match in [("http://127.0.0.1:99999", "port 99999 is not in 1-65535"), ("http://host:abc", "port")]:
        with pytest.raises(EngineSpecError, match=match):
            load_policy(f"openai:{url}#m", tokenizer=TOK)
    # a local model folder as MODEL gives the tokenizer
    policy = load_policy(f"openai:http://127.0.0.1:1/v1/#{tiny_policy_path}")
    assert policy.endpoint == "http://127.0.0.1:1/v1/completions"
    assert policy.tokenizer.encode("<end_of_step>") == TOK.encode("<end_of_step>")


def test_spec_options(tiny_policy_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    policy = load_policy(
        f"openai:http://127.0.0.1:1/v1#Qwen/Qwen2.5-Math-7B,tokenizer={tiny_policy_path},timeout=5,"
        "max_retries=1,max_in_flight=3,max_model_len=4096,vllm_extensions=false"
    )
    assert isinstance(policy, OpenAIPolicy) and policy.model == "Qwen/Qwen2.5-Math-7B"
    assert (policy.timeout_s, policy.max_retries, policy.max_in_flight, policy.max_model_len) == (5, 1, 3, 4096)
    assert policy.vllm_extensions is False and policy.headers == {"Authorization": "Bearer sk-from-env"}
    assert policy.tokenizer.encode("<end_of_step>") == TOK.encode("<end_of_step>")
    # the spec wins over a keyword option; the key comes from the variable named
    monkeypatch.setenv("MY_KEY", "sk-mine")
    policy = load_policy("openai:http://127.0.0.1:1#m,max_retries=2,api_key_env=MY_KEY", tokenizer=TOK, max_retries=7)
    assert policy.max_retries == 2 and policy.headers == {"Authorization": "Bearer sk-mine"}
    monkeypatch.delenv("OPENAI_API_KEY")
    assert load_policy("openai:http://127.0.0.1:1#m", tokenizer=TOK).headers == {}
    # a key that cannot go in an HTTP header is refused at load, and never shown
    for key in ("sk-abc\n", "sk-ключ", "sk abc"):
        monkeypatch.setenv("MY_KEY", key)
        with pytest.raises(EngineSpecError, match="API key in MY_KEY holds whitespace or a non-ASCII") as info:
            load_policy("openai:http://127.0.0.1:1#m,api_key_env=MY_KEY", tokenizer=TOK)
        assert key.strip() not in str(info.value)
    for spec, match in [
        ("m,api_key=sk-123", "OPENAI_API_KEY"),  # never a key in the spec text: it ends up in logs
        ("m,api_key_env=NO_SUCH_VARIABLE", "NO_SUCH_VARIABLE"),
        ("m,colour=red", "unknown option 'colour'"),
        ("m,timeout=soon", "timeout"),
        ("m,timeout=0", "timeout"),
        ("m,max_retries=-1", "max_retries"),
        ("m,vllm_extensions=maybe", "vllm_extensions"),
        ("m,oops", "key=value"),
    ]:
        with pytest.raises(EngineSpecError, match=match):
            load_policy(f"openai:http://127.0.0.1:1#{spec}", tokenizer=TOK)


def test_a_tokenizer_of_one_s_own_needs_only_encode_and_decode() -> None:
    """What `Tokenizer` (and the README) ask of one: an end-of-sequence id is optional."""

    class Plain:
        def encode(self, text: str) -> list[int]:
            return TOK.encode(text)

        def decode(self, ids) -> str:  # type: ignore[no-untyped-def]
            return TOK.decode(ids)

    policy = load_policy("openai:http://127.0.0.1:1#m", tokenizer=Plain())
    assert policy.tokenizer.encode("x") == TOK.encode("x") and policy._eos_texts == ()


def test_a_tokenizer_folder_without_tokenizer_fails_at_load(tiny_policy_path: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(tiny_policy_path / "config.json", tmp_path / "config.json")
    with pytest.raises(EngineSpecError, match=f"openai: {tmp_path} holds no tokenizer"):
        load_policy(f"openai:http://127.0.0.1:1#m,tokenizer={tmp_path}")


# ---- fakes on loopback --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def _fake(handler, models: list[dict] | Callable | None = None) -> AsyncIterator[str]:
    """A fake server at the URL yielded: `handler` answers completions; GET /v1/models lists
    `models` when given, or is answered by `models` when it is a handler."""
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    if callable(models):
        app.router.add_get("/v1/models", models)
    elif models is not None:

        async def listing(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": models})

        app.router.add_get("/v1/models", listing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _ok(texts: list[str], finish: str = "length", **extra) -> dict:
    return {"choices": [{"index": i, "text": t, "finish_reason": finish, **extra} for i, t in enumerate(texts)]}


async def test_retries_on_429_and_5xx() -> None:
    seen: list[dict] = []
    statuses = [429, 500, 503]

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.json())
        if statuses:
            status = statuses.pop(0)
            return web.json_response({"error": "busy"}, status=status, headers={"Retry-After": "0"})
        return web.json_response(_ok(["fine"]))

    async with _fake(handler) as url:
        policy = _client(url, backoff=0.001, max_retries=5)
        (c,) = await policy.generate([104, 105], SamplingParams(max_tokens=4, stop=("x",), top_k=3, seed=1))
        assert c.text == "fine" and c.finish_reason == "length" and policy.retries == 3
        body = seen[-1]
        assert body["prompt"] == [104, 105] and body["stop"] == ["x"] and body["top_k"] == 3
        assert body["include_stop_str_in_output"] is True and body["seed"] == 1 and body["model"] == "tiny"
        assert body["skip_special_tokens"] is False and body["spaces_between_special_tokens"] is False
        # out of retries: a clear error naming the status
        statuses.extend([500] * 3)
        policy.max_retries = 2
        with pytest.raises(EngineError, match="HTTP 500"):
            await policy.generate([1], SamplingParams(max_tokens=1))
        await policy.close()


async def test_retry_after_is_honoured_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = ["30", "1000"]

    async def handler(request: web.Request) -> web.Response:
        if waits:
            return web.json_response({"error": "busy"}, status=429, headers={"Retry-After": waits.pop(0)})
        return web.json_response(_ok(["fine"]))

    slept: list[float] = []

    async def record(delay: float) -> None:  # the wait before a retry, taken at once
        slept.append(delay)

    async with _fake(handler) as url:
        policy = _client(url, backoff=0.001)
        monkeypatch.setattr(policy, "_pause", record)
        (c,) = await policy.generate([1], SamplingParams(max_tokens=2))
        monkeypatch.undo()
        assert c.text == "fine" and policy.retries == 2
        assert 30.0 in slept and 120.0 in slept  # as asked, and at most two minutes
        await policy.close()


@pytest.mark.timeout(60)
async def test_close_ends_requests_waiting_to_retry_and_in_flight() -> None:
    hits: list[int] = []
    answered, release = asyncio.Event(), asyncio.Event()

    async def busy(request: web.Request) -> web.Response:
        hits.append(1)
        if len(hits) == 1:
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "30"})
        answered.set()
        await release.wait()  # the second request is still being answered when close() comes
        return web.json_response(_ok(["late"]))

    async with _fake(busy) as url:
        policy = _client(url, max_retries=5)
        waiting = asyncio.create_task(policy.generate([1], SamplingParams(max_tokens=2)))
        while not hits:
            await asyncio.sleep(0.01)
        in_flight = asyncio.create_task(policy.generate([2], SamplingParams(max_tokens=2)))
        await answered.wait()
        await policy.close()
        for task in (waiting, in_flight):  # each ends now, saying why, and is not sent again
            with pytest.raises(EngineError, match="is closed"):
                await asyncio.wait_for(task, 10)
        assert len(hits) == 2 and policy.retries == 1
        release.set()


async def test_a_certificate_that_fails_verification_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    import httpx

    calls: list[str] = []

    async def refused(self, url, **kwargs):
        calls.append(str(url))
        try:
            raise ssl.SSLCertVerificationError("certificate verify failed: self-signed certificate")
        except ssl.SSLError as exc:
            raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed") from exc

    monkeypatch.setattr(httpx.AsyncClient, "post", refused)
    policy = _client("https://127.0.0.1:9", max_model_len=64, backoff=0.001)
    with pytest.raises(EngineError, match="TLS certificate failed verification"):
        await policy.generate([1], SamplingParams(max_tokens=2))
    assert len(calls) == 1 and policy.retries == 0
    await policy.close()


@pytest.mark.timeout(60)
async def test_timeout_bounds_the_whole_answer() -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:  # a byte every 0.2 s: no read waits 1 s
        data = b'{"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}' + b" " * 200
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(data))})
        await resp.prepare(request)
        for i in range(len(data)):
            await resp.write(data[i : i + 1])
            await asyncio.sleep(0.2)
        return resp

    async with _fake(trickle) as url:
        policy = _client(url, timeout=1.0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(EngineError, match="within 1.0 s"):
            await policy.generate([1], SamplingParams(max_tokens=2))
        assert asyncio.get_running_loop().time() - started < 10
        await policy.close()


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (web.Response(text="<html>oops</html>"), "not JSON"),
        (web.json_response({"choices": []}), "0 choices"),
        (web.json_response({"nothing": 1}), "no choices"),
        (web.json_response({"choices": [{"index": 0, "finish_reason": "stop"}]}), "without text"),
        (web.json_response(_ok(["x"], finish="abort")), "finish_reason"),
        (web.json_response({"error": "bad request"}, status=400), "HTTP 400"),
        (web.Response(body=b"not gzip", headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}),
         "request to http://127.0.0.1:[0-9]+/v1/completions failed: DecodingError"),
    ],
)
async def test_malformed_answers_raise(answer: web.Response, match: str) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return answer

    async with _fake(handler) as url:
        policy = _client(url, backoff=0.001)
        with pytest.raises(EngineError, match=match):
            await policy.generate([1, 2], SamplingParams(max_tokens=2))
        assert calls == 1  # not retried
        await policy.close()


async def test_stop_handling_of_other_servers() -> None:
    answers = [
        _ok(["abc"], finish="stop", matched_stop="<end_of_step>"),  # SGLang names the stop
        _ok(["abc<end_of_step>def"], finish="length"),  # text past a stop is cut
        _ok(["abc"], finish="stop", stop_reason=None, matched_stop="<end_of_step>"),  # a null beside a name
        _ok(["abc"], finish="stop", stop_reason=None),  # nothing named: EOS
    ]

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(answers.pop(0))

    async with _fake(handler) as url:
        policy = _client(url)
        params = SamplingParams(max_tokens=9, stop=("<end_of_step>",))
        for stop in ("<end_of_step>", "<end_of_step>", "<end_of_step>", None):
            (c,) = await policy.generate([1], params)
            assert c.stop == stop and c.finish_reason == "stop"
            assert c.text == "abc" + (stop or "") and c.token_ids == TOK.encode(c.text)
        await policy.close()


async def test_context_errors_of_other_servers_say_what_to_do() -> None:
    async def trtllm_serve(request: web.Request) -> web.Response:
        message = "The sum of prompt length (30) and max_tokens (2048) should not exceed max_seq_len (64)"
        return web.json_response({"object": "error", "message": message, "code": 400}, status=400)

    async with _fake(trtllm_serve) as url:
        policy = _client(url, max_retries=0)
        with pytest.raises(EngineError, match="max_model_len=N in the spec"):
            await policy.generate([1] * 30, SamplingParams(max_tokens=2048))
        await policy.close()


async def test_requests_fit_sglangs_context_checks() -> None:
    """SGLang refuses prompt + max_tokens that reaches its context (before it allowed equality;
    still with speculative decoding's reserve), and a prompt within 6 tokens of it."""
    sent: list[int] = []

    async def sglang(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = len(body["prompt"])
        if prompt + body["max_tokens"] >= 64 or prompt >= 64 - 6:
            message = (f"Requested token count exceeds the model's maximum context length of 64 tokens. You "
                       f"requested a total of {prompt + body['max_tokens']} tokens")
            return web.json_response({"object": "error", "message": message, "code": 400}, status=400)
        sent.append(prompt)
        return web.json_response(_ok(["ab"] * body["n"]))

    async with _fake(sglang, models=[{"id": "tiny", "max_model_len": 64}]) as url:
        policy = _client(url, max_retries=0)
        for length in range(1, 66):  # every prompt: an answer, or empty completions without a request
            out = await policy.generate([1] * length, SamplingParams(n=2, max_tokens=2048))
            assert [c.text for c in out] == (["ab", "ab"] if length in sent else ["", ""])
        assert sent == list(range(1, 64 - CONTEXT_RESERVE))
        await policy.close()
        # a server that keeps still more back (speculative decoding): the error says what to do
        policy = _client(url, max_retries=0, max_model_len=70)
        with pytest.raises(EngineError, match="smaller max_model_len=N"):
            await policy.generate([1] * 40, SamplingParams(max_tokens=2048))
        await policy.close()


async def test_greedy_samples_go_out_as_one() -> None:
    """vLLM and trtllm-serve refuse n > 1 at temperature 0: one sample is asked for and copied."""
    seen: list[dict] = []

    async def vllm(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body["temperature"] < 1e-5 and body["n"] > 1:
            return web.json_response({"object": "error", "message": "n must be 1 when using greedy sampling, "
                                      f"got {body['n']}.", "code": 400}, status=400)
        return web.json_response(_ok(["ab"] * body["n"], finish="stop"))

    async with _fake(vllm) as url:
        for split_n in (False, True):
            seen.clear()
            policy = _client(url, max_retries=0, split_n=split_n)
            out = await policy.generate([1, 2], SamplingParams(n=3, max_tokens=4, temperature=0))
            assert [(c.text, c.token_ids) for c in out] == [("ab", TOK.encode("ab"))] * 3
            assert len({id(c.token_ids) for c in out}) == 3  # copies, not one list three times
            assert [b["n"] for b in seen] == [1]
            await policy.close()


async def test_split_n_sends_one_sample_per_request_seeded_as_vllm_seeds_them() -> None:
    """For servers whose n samples of one request share its seed (SGLang): n requests of one
    sample each, the i-th seeded seed + i; unseeded ones stay unseeded."""
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response(_ok([f"s{body.get('seed')}"]))

    async with _fake(handler) as url:
        policy = load_policy(f"openai:{url}#tiny,split_n=true", tokenizer=TOK, backoff=0.001)
        out = await policy.generate([1], SamplingParams(n=3, max_tokens=2, seed=10))
        assert [c.text for c in out] == ["s10", "s11", "s12"]
        assert sorted(b["seed"] for b in seen) == [10, 11, 12] and all(b["n"] == 1 for b in seen)
        seen.clear()
        out = await policy.generate([1], SamplingParams(n=2, max_tokens=2))
        assert [c.text for c in out] == ["sNone"] * 2 and all("seed" not in b and b["n"] == 1 for b in seen)
        await policy.close()


async def test_max_tokens_fits_the_context() -> None:
    seen: list[dict] = []

    async def vllm(request: web.Request) -> web.Response:  # vLLM's answer when the request overflows
        body = await request.json()
        seen.append(body)
        if len(body["prompt"]) + body["max_tokens"] > 64:
            message = (f"'max_tokens' or 'max_completion_tokens' is too large: {body['max_tokens']}. This model's "
                       f"maximum context length is 64 tokens and your request has {len(body['prompt'])} input tokens")
            return web.json_response({"object": "error", "message": message, "code": 400}, status=400)
        return web.json_response(_ok(["ab"] * body["n"]))

    params = SamplingParams(n=2, max_tokens=2048)
    async with _fake(vllm, models=[{"id": "other"}, {"id": "tiny", "max_model_len": 64}]) as url:
        policy = _client(url)  # the context comes from /v1/models, less the reserve
        out = await policy.generate(list(range(1, 51)), params)
        assert [c.text for c in out] == ["ab", "ab"] and seen[-1]["max_tokens"] == 64 - 50 - CONTEXT_RESERVE
        # a prompt that leaves no room: empty completions end the branch, nothing is sent
        for length in (64 - CONTEXT_RESERVE, 64, 70):
            out = await policy.generate([1] * length, params)
            assert [(c.text, c.token_ids, c.finish_reason) for c in out] == [("", [], "length")] * 2
        assert len(seen) == 1
        await policy.close()
    lora = [{"id": "tiny", "parent": "base"}, {"id": "base", "max_model_len": 64}]
    async with _fake(vllm, models=lora) as url:  # a LoRA adapter's card: its base model's context
        policy = _client(url)
        await policy.generate(list(range(1, 51)), params)
        assert seen[-1]["max_tokens"] == 64 - 50 - CONTEXT_RESERVE
        await policy.close()
    async with _fake(vllm) as url:  # no /v1/models
        policy = _client(url, max_model_len=32)  # as the spec's max_model_len=32 gives it
        await policy.generate([1] * 20, params)
        assert seen[-1]["max_tokens"] == 32 - 20 - CONTEXT_RESERVE
        await policy.close()
        policy = _client(url, max_retries=0)  # context unknown: vLLM's 400, with what to do
        with pytest.raises(EngineError, match="max_model_len"):
            await policy.generate([1] * 30, params)
        await policy.close()


async def test_a_failed_context_question_is_asked_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_engine, "CONTEXT_RETRY_S", 0.5)
    statuses = [503]
    asked = 0
    seen: list[int] = []

    async def listing(request: web.Request) -> web.Response:  # a server still loading its model
        nonlocal asked
        asked += 1
        if statuses:
            return web.json_response({"error": "loading"}, status=statuses.pop(0))
        return web.json_response({"object": "list", "data": [{"id": "tiny", "max_model_len": 64}]})

    async def handler(request: web.Request) -> web.Response:
        seen.append((await request.json())["max_tokens"])
        return web.json_response(_ok(["ab"]))

    async with _fake(handler, models=listing) as url:
        policy = _client(url)
        params = SamplingParams(max_tokens=2048)
        for _ in range(2):  # the first asks and hears 503; the second comes too soon to ask again
            await policy.generate([1] * 50, params)
        assert (asked, seen) == (1, [2048, 2048])
        await asyncio.sleep(0.6)
        for _ in range(2):  # asked again, answered, and the answer is kept
            await policy.generate([1] * 50, params)
        assert (asked, seen[2:]) == (2, [64 - 50 - CONTEXT_RESERVE] * 2)
        await policy.close()


async def test_eos_text_is_left_out() -> None:
    # vLLM v1 with include_stop_str_in_output and skip_special_tokens false ends an EOS stop
    # with the EOS token's text
    answers = [
        _ok(["The answer is \\boxed{4}<|endoftext|>"], finish="stop", stop_reason=None),
        _ok(["<|endoftext|> is how a text ends"], finish="length"),
    ]

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(answers.pop(0))

    async with _fake(handler) as url:
        policy = _client(url)
        params = SamplingParams(max_tokens=9, stop=("<end_of_step>",))
        (c,) = await policy.generate([1], params)
        assert (c.text, c.finish_reason, c.stop) == ("The answer is \\boxed{4}", "stop", None)
        assert c.token_ids == TOK.encode(c.text) and TOK.eos_token_id not in c.token_ids
        (c,) = await policy.generate([1], params)  # only a trailing EOS of an EOS stop goes
        assert c.text == "<|endoftext|> is how a text ends"
        await policy.close()


async def test_half_a_surrogate_pair_becomes_a_replacement_character() -> None:
    """A lone surrogate escaped in the JSON ("\\ud83d") has no UTF-8: it cannot reach the
    tokenizer or the forest as it is."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(_ok(["x = 1 # \ud83d ok"], finish="length")),
                            content_type="application/json")

    async with _fake(handler) as url:
        policy = _client(url)
        (c,) = await policy.generate([1], SamplingParams(max_tokens=9))
        assert c.text == "x = 1 # \ufffd ok" and c.token_ids == TOK.encode(c.text)
        await policy.close()


async def test_in_flight_bound() -> None:
    active = peak = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return web.json_response(_ok(["ok"]))

    async with _fake(handler) as url:
        policy = _client(url, max_in_flight=3)
        await asyncio.gather(*[policy.generate([1], SamplingParams(max_tokens=1)) for _ in range(12)])
        assert 1 <= peak <= 3
        await policy.close()


async def test_every_eos_of_the_model_is_left_out(tiny_policy_path, tmp_path) -> None:
    import json
    import shutil

    from rstar_fast.engines.stops import HFTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_policy_path, folder)
    (extra,) = HFTokenizer.from_path(folder).encode("<end_of_step>")  # stands for Qwen's <|im_end|>
    eos = HFTokenizer.from_path(folder).eos_token_id
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, extra]}))

    async def handler(request: web.Request) -> web.Response:  # vLLM: an EOS stop keeps its text
        return web.json_response(_ok(["x = 1<end_of_step>"], finish="stop", stop_reason=None))

    async with _fake(handler) as url:
        policy = _client(url, tokenizer=str(folder))
        (c,) = await policy.generate([1], SamplingParams(max_tokens=9, stop=("<end_of_answer>",)))
        assert (c.text, c.stop, c.finish_reason) == ("x = 1", None, "stop")
        await policy.close()


def test_the_client_of_each_event_loop_is_closed(server_url: str) -> None:
    policy = _client(server_url)
    clients = []

    async def use() -> None:
        await policy.generate(TOK.encode("ab"), SamplingParams(temperature=0, max_tokens=1))
        clients.append(policy._client)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(use())  # one event loop per asyncio.run, as two searches in a script make
        asyncio.run(use())
        asyncio.run(policy.close())
        gc.collect()
    assert len(clients) == 2 and clients[0] is not clients[1]
    assert all(client.is_closed for client in clients)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


async def test_unreachable_server() -> None:
    policy = _client(f"http://127.0.0.1:{_free_port()}", backoff=0.001, max_retries=2)
    with pytest.raises(EngineUnavailableError, match="cannot reach"):
        await policy.generate([1], SamplingParams(max_tokens=1))
    assert policy.retries == 2
    await policy.close()


_HANGING_SERVER = """
import asyncio, sys
from aiohttp import web
async def handler(request):
    print("request", flush=True)
    await asyncio.sleep(3600)
async def main():
    app = web.Application(); app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app); await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0); await site.start()
    print("serving fake on", site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.mark.timeout(60)
async def test_server_killed_mid_request() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANGING_SERVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        port = _read_banner(proc)
        policy = _client(f"http://127.0.0.1:{port}", backoff=0.001, max_retries=2)
        task = asyncio.ensure_future(policy.generate([1, 2, 3], SamplingParams(max_tokens=4)))
        line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)  # type: ignore[union-attr]
        assert line.startswith("request")  # the request is in flight on the server
        proc.kill()
        with pytest.raises(EngineUnavailableError, match="dropped|cannot reach"):
            await task
        await policy.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_a_client_busy_on_one_event_loop_refuses_another() -> None:
    # another thread's loop would have closed this loop's client under its request
    import threading

    from rstar_fast.engines import EngineInUseError

    answered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        answered.set()
        await release.wait()
        return web.json_response(_ok(["first"]))

    async with _fake(slow) as url:
        policy = _client(url)
        first = asyncio.create_task(policy.generate([1], SamplingParams(max_tokens=2)))
        await answered.wait()
        other: list[BaseException] = []

        def from_another_loop() -> None:
            try:
                asyncio.run(policy.generate([2], SamplingParams(max_tokens=2)))
            except BaseException as e:  # noqa: BLE001
                other.append(e)

        thread = threading.Thread(target=from_another_loop)
        thread.start()
        await asyncio.to_thread(thread.join, 30)
        assert len(other) == 1 and isinstance(other[0], EngineInUseError), other
        release.set()
        (c,) = await asyncio.wait_for(first, 10)
        assert c.text == "first"
        await policy.close()


async def _answered(answer: Callable[[dict], dict], params: SamplingParams, **client) -> tuple[list, list[dict]]:
    """The completions a client of a fake server returns for `params`, and the bodies it sent."""
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response(answer(body))

    async with _fake(handler) as url:
        policy = _client(url, backoff=0.001, **client)
        try:
            return await policy.generate([104, 105, 106, 107, 108], params), seen
        finally:
            await policy.close()


async def test_a_request_carries_every_sampling_setting_and_reads_choices_by_index() -> None:
    params = SamplingParams(n=3, temperature=0.5, top_p=0.25, top_k=1, seed=0, max_tokens=4)
    out, (body,) = await _answered(lambda b: {"choices": _ok(["zero", "one", "two"])["choices"][::-1]}, params)
    assert (body["n"], body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (3, 0.5, 0.25, 1, 0)
    assert [c.text for c in out] == ["zero", "one", "two"]


async def test_greedy_samples_are_one_request_copied() -> None:
    out, seen = await _answered(lambda b: _ok(["g"] * b["n"]), SamplingParams(n=2, temperature=0, max_tokens=4))
    assert [b["n"] for b in seen] == [1] and [c.text for c in out] == ["g", "g"]
