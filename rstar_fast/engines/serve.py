"""A small OpenAI-compatible completions server over an `hf:` model (the `serve` extra).

    rstar-fast serve MODEL_FOLDER [--host 127.0.0.1] [--port 8000] [--device cpu]
    python -m rstar_fast.engines.serve MODEL_FOLDER ...        # the same

Serves `POST /v1/completions` (prompt as text, encoded with the tokenizer's BOS first where it
adds one, as vLLM does, or as token ids; n, max_tokens, temperature, top_p,
top_k, stop, seed, and vLLM's `include_stop_str_in_output`), `GET /v1/models` and `GET /health`,
through `HFPolicy`, so concurrent HTTP requests are batched continuously. `stream`, `echo`,
`logprobs`, a `best_of` other than n, sampling it does not do (penalties, `logit_bias`, ...),
`skip_special_tokens: true` (the text keeps special tokens, as the `openai:` engine asks) and any
field it does not read are not supported: they are answered with 400, not ignored; so is
an n above `--max-batch-rows` (a request runs as one batch: a huge n would stall every other
client). It is what the `openai:` tests talk to, and a stand-in for vLLM / trtllm-serve /
SGLang where none is installed. Like vLLM it drops the stop string from the text unless
`include_stop_str_in_output` is true, and names the matched stop in `stop_reason`. With
`--port 0` it picks a free port; the first line it prints is `serving NAME on http://HOST:PORT`.
Errors, unknown paths and methods included, are OpenAI's JSON `{"error": {"message": ...,
"type": ...}}`, of type `server_error` for a 5xx and `invalid_request_error` otherwise. A
startup failure (a missing folder, a port in use or out of range) is one error line, as with
every rstar-fast command; the port is taken before the model loads.

Limits: `/v1/models` reports the model's context as `max_model_len` (as vLLM does). A prompt
that fills the context is refused with 400; a `max_tokens` beyond what is left after the prompt
is cut to it (vLLM answers 400 there instead), so no request runs past the context. A request
whose client disconnects stops generating at the next token, and Ctrl-C stops the server at
once, requests in flight or not (their clients get an error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

from rstar_fast.engines.base import EngineError, EngineUnavailableError, SamplingParams

if TYPE_CHECKING:  # imported when serving: the CLI registers `serve` without torch or aiohttp
    from aiohttp import web

    from rstar_fast.engines.hf import HFPolicy

log = logging.getLogger(__name__)


def _field(body: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    """body[key] as an int or a float (null: the default, as OpenAI and vLLM read it), or
    ValueError naming the key: a bool, a string or a fractional count is no number here."""
    value = body.get(key)
    if value is None:
        return default
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key} must be {wanted}, got {json.dumps(value)[:80]}")
    try:
        return kind(value)
    except (ValueError, OverflowError):  # int(Infinity)
        raise ValueError(f"{key} must be {wanted}, got {value!r}") from None


MAX_STOPS = 64  # stop strings per request: each is matched against every row at every token
MAX_BODY_BYTES = 8 << 20  # a request body: room for a long prompt's ids, not for a flood


def _params(body: dict[str, Any], vocab_size: int) -> SamplingParams:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {json.dumps(stop)[:80]}")
    if len(stop) > MAX_STOPS:
        raise ValueError(f"stop has {len(stop)} strings: this server takes at most {MAX_STOPS}")
    for s in stop:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"stop string {s!r} is not valid text (a lone surrogate)") from None
    top_k = body.get("top_k")
    return SamplingParams(
        n=_field(body, "n", 1, int),
        temperature=_field(body, "temperature", 1.0, float),
        top_p=_field(body, "top_p", 1.0, float),
        # past the vocabulary a cut keeps every token: the same as none
        top_k=min(_field(body, "top_k", -1, int), vocab_size) if top_k not in (None, 0) else -1,
        max_tokens=_field(body, "max_tokens", 16, int),
        stop=tuple(stop),
        seed=_field(body, "seed", None, int),
    )


# fields of vLLM's and OpenAI's completions API this server does not implement, and the values
# that ask for nothing (what a client library sends when the caller set nothing)
_SAMPLING_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0), "logit_bias": (None, {}), "min_tokens": (None, 0), "ignore_eos": (None, False),
    "suffix": (None, ""), "stop_token_ids": (None, []),
    # the text keeps special tokens as they are (vLLM's default drops them)
    "skip_special_tokens": (None, False), "spaces_between_special_tokens": (None, False),
}
# the fields this server reads; any other is refused rather than ignored
_READ = {"model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
         "include_stop_str_in_output", "user", "stream", "echo", "logprobs", "best_of", *_SAMPLING_DEFAULTS}


def _unsupported(body: dict[str, Any], n: int) -> str | None:
    """The first field asking for what this server does not do, said as an error message."""
    unknown = sorted(key for key in body if key not in _READ)
    if unknown:
        return f"{unknown[0]} is not a field this server (rstar-fast serve) reads"
    asked = {
        "stream": bool(body.get("stream")),
        "echo": bool(body.get("echo")),
        "logprobs": body.get("logprobs") is not None,
        "best_of": body.get("best_of") not in (None, n),
        # sampling this server does not do: ignored, they would change what a client gets
        **{key: body.get(key) not in defaults for key, defaults in _SAMPLING_DEFAULTS.items()},
    }
    name = next((key for key, on in asked.items() if on), None)
    if name is None:
        return None
    return f"{name}={json.dumps(body[name])} is not supported by this server (rstar-fast serve)"


def build_app(policy: HFPolicy, model_name: str) -> web.Application:
    """The aiohttp application serving `policy` under `model_name`."""
    from aiohttp import web

    def error(status: int, message: str) -> web.Response:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return web.json_response({"error": {"message": message, "type": kind}}, status=status)

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        """aiohttp's own answers (404, 405, 413) as JSON errors too, which clients parse."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = error(exc.status, f"{request.method} {request.path}: {exc.reason}")
            if "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        except Exception as exc:  # a bug: the client still gets JSON, the log the traceback
            log.exception("%s %s failed", request.method, request.path)
            return error(500, f"{request.method} {request.path}: {type(exc).__name__}: {exc}")

    async def completions(request: web.Request) -> web.Response:
        try:
            try:
                body = await request.json()
            except RecursionError:
                raise ValueError("the body is JSON nested too deeply") from None
            except LookupError:  # the Content-Type names a charset Python does not know
                raise ValueError(f"unknown charset {request.charset!r} in the Content-Type") from None
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                # off the event loop: a long text would hold every other client while it encodes;
                # BOS first where the tokenizer adds one, as vLLM encodes a text prompt
                bos = getattr(policy.tokenizer, "bos_ids", ())
                ids = [*bos, *await asyncio.to_thread(policy.tokenizer.encode, prompt)]
            elif isinstance(prompt, list):
                ids = prompt
            else:
                raise ValueError("prompt must be one string or one list of token ids")
            # the length first: it costs nothing, the scans below cost a pass over every id
            if policy.max_model_len is not None and len(ids) >= policy.max_model_len:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens: nothing fits in this model's context of "
                    f"{policy.max_model_len} tokens"
                )
            if not all(isinstance(i, int) for i in ids):
                raise ValueError("prompt must be one string or one list of token ids")
            if not ids or not all(0 <= i < policy.vocab_size for i in ids):
                raise ValueError(f"prompt token ids must be non-empty and in [0, {policy.vocab_size})")
            params = _params(body, policy.vocab_size)
            if params.n > policy.max_batch_rows:
                raise ValueError(
                    f"n={params.n} is more than this server's limit of {policy.max_batch_rows} samples per "
                    "request (its --max-batch-rows)"
                )
            unsupported = _unsupported(body, params.n)
            if unsupported is not None:
                raise ValueError(unsupported)
            keep_stop = body.get("include_stop_str_in_output") or False
            if not isinstance(keep_stop, bool):
                raise ValueError(f"include_stop_str_in_output must be true or false, got {json.dumps(keep_stop)[:80]}")
        except (ValueError, TypeError) as exc:
            return error(400, str(exc))
        if body.get("model") not in (None, model_name):
            return error(404, f"model {body.get('model')!r} is not served here (serving {model_name!r})")
        try:
            comps = await policy.generate(ids, params)
        except EngineError as exc:
            return error(500, str(exc))
        choices = []
        for i, c in enumerate(comps):
            text = c.text
            if c.stop is not None and not keep_stop:
                text = text[: len(text) - len(c.stop)]
            choices.append(
                {"index": i, "text": text, "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": c.stop}
            )
        generated = sum(c.sampled_count for c in comps)
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": len(ids),
                    "completion_tokens": generated,
                    "total_tokens": len(ids) + generated,
                },
            }
        )

    started = int(time.time())

    async def models(request: web.Request) -> web.Response:
        model = {"id": model_name, "object": "model", "created": started, "owned_by": "rstar-fast",
                 "max_model_len": policy.max_model_len}
        return web.json_response({"object": "list", "data": [model]})

    async def health(request: web.Request) -> web.Response:
        """200 once serving, as vLLM's readiness probe answers."""
        return web.Response(status=200)

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors])
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or EngineUnavailableError saying what to do."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535
        sock.close()
        reason = getattr(exc, "strerror", None) or exc
        raise EngineUnavailableError(
            f"cannot listen on {host}:{port}: {reason} (pick another --port, or 0 for a free one)"
        ) from exc
    return sock


async def serve(path: str, host: str, port: int, model_name: str | None, **options: Any) -> None:
    """Serve the model in `path` until cancelled."""
    from aiohttp import web

    from rstar_fast.engines.hf import HFPolicy

    with _listen(host, port) as sock:  # before the model loads: a busy port fails at once
        policy = HFPolicy(path, **options)
        name = model_name or path
        # handler_cancellation: a client that disconnects cancels its request, which stops generating
        # shutdown_timeout: at Ctrl-C the engine has failed every request already; a client
        # still sending its body must not hold the exit for aiohttp's default minute
        runner = web.AppRunner(build_app(policy, name), access_log=None, handler_cancellation=True,
                               shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
            shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
            print(f"serving {name} on http://{shown}:{sock.getsockname()[1]}", flush=True)
            await asyncio.Event().wait()
        finally:
            # the engine first: it stops the batch in flight and fails its requests, so the
            # server's shutdown does not wait for them
            await policy.close()
            await runner.cleanup()


def _port(text: str) -> int:
    """An argparse type: a TCP port number (0: any free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from rstar_fast.cli import at_least

    p.add_argument("model", help="a transformers model folder (config, weights, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--model-name", default=None, help="name clients use (default: the folder path)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16")
    p.add_argument("--max-batch-rows", type=at_least(1, int), default=None,
                   help="sequences decoded at once, and the largest n a request may ask (default 256)")
    p.add_argument("--prompt-cache-gib", type=at_least(0, float), default=2.0,
                   help="memory for the keys and values of recent prompts, so a prompt that extends one "
                        "prefills only its tail (default 2; 0 turns the cache off)")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C (exit status 0); the CLI reports an EngineError as one line."""
    try:
        asyncio.run(
            serve(
                args.model, args.host, args.port, args.model_name,
                device=args.device, dtype=args.dtype, max_batch_rows=args.max_batch_rows,
                prompt_cache_gib=args.prompt_cache_gib,
            )
        )
    except KeyboardInterrupt:  # the way to stop a server, not a failure
        pass
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible completions server over a transformers model",
        description=__doc__.split("\n\n")[0],
    )
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m rstar_fast.engines.serve ARGS` is `rstar-fast serve ARGS`."""
    from rstar_fast.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
