"""A small OpenAI-compatible completions server over an `hf:` model.

    python -m rstar_fast.engines.serve MODEL_FOLDER [--host 127.0.0.1] [--port 8000] [--device cpu]

Serves `POST /v1/completions` (prompt as text or token ids, n, max_tokens, temperature, top_p,
top_k, stop, seed, and vLLM's `include_stop_str_in_output`) and `GET /v1/models`, through
`HFPolicy`, so concurrent HTTP requests are batched together. It is what the `openai:` tests
talk to, and a stand-in for vLLM / trtllm-serve / SGLang where none is installed. Like vLLM it
drops the stop string from the text unless `include_stop_str_in_output` is true, and names the
matched stop in `stop_reason`. With `--port 0` it picks a free port; the first line it prints
is `serving NAME on http://HOST:PORT`.

Limits: `/v1/models` reports the model's context as `max_model_len` (as vLLM does). A prompt
that fills the context is refused with 400; a `max_tokens` beyond what is left after the prompt
is cut to it (vLLM answers 400 there instead), so no request runs past the context. A request
whose client disconnects stops generating at the next token, and Ctrl-C stops the server at
once, requests in flight or not (their clients get an error).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
import uuid
from typing import Any

from aiohttp import web

from rstar_fast.engines.base import EngineError, SamplingParams
from rstar_fast.engines.hf import HFPolicy


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def _field(body: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    """body[key] as an int or a float, or ValueError naming the key (int(Infinity) overflows)."""
    value = body.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _params(body: dict[str, Any]) -> SamplingParams:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    top_k = body.get("top_k")
    return SamplingParams(
        n=_field(body, "n", 1, int),
        temperature=_field(body, "temperature", 1.0, float),
        top_p=_field(body, "top_p", 1.0, float),
        top_k=_field(body, "top_k", -1, int) if top_k not in (None, 0) else -1,
        max_tokens=_field(body, "max_tokens", 16, int),
        stop=tuple(str(s) for s in stop),
        seed=None if body.get("seed") is None else _field(body, "seed", None, int),
    )


def build_app(policy: HFPolicy, model_name: str) -> web.Application:
    """The aiohttp application serving `policy` under `model_name`."""

    async def completions(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = policy.tokenizer.encode(prompt)
            elif isinstance(prompt, list) and all(isinstance(i, int) for i in prompt):
                ids = prompt
            else:
                raise ValueError("prompt must be one string or one list of token ids")
            if not ids or not all(0 <= i < policy.vocab_size for i in ids):
                raise ValueError(f"prompt token ids must be non-empty and in [0, {policy.vocab_size})")
            if policy.max_model_len is not None and len(ids) >= policy.max_model_len:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens: nothing fits in this model's context of "
                    f"{policy.max_model_len} tokens"
                )
            params = _params(body)
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        if body.get("model") not in (None, model_name):
            return _error(404, f"model {body.get('model')!r} is not served here (serving {model_name!r})")
        try:
            comps = await policy.generate(ids, params)
        except EngineError as exc:
            return _error(500, str(exc))
        keep_stop = bool(body.get("include_stop_str_in_output", False))
        choices = []
        for i, c in enumerate(comps):
            text = c.text
            if c.stop is not None and not keep_stop:
                text = text[: len(text) - len(c.stop)]
            choices.append(
                {"index": i, "text": text, "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": c.stop}
            )
        generated = sum(len(c.token_ids) for c in comps)
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

    async def models(request: web.Request) -> web.Response:
        model = {"id": model_name, "object": "model", "max_model_len": policy.max_model_len}
        return web.json_response({"object": "list", "data": [model]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    return app


async def serve(path: str, host: str, port: int, model_name: str | None, **options: Any) -> None:
    policy = HFPolicy(path, **options)
    name = model_name or path
    # handler_cancellation: a client that disconnects cancels its request, which stops generating
    runner = web.AppRunner(build_app(policy, name), access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock)
    await site.start()
    print(f"serving {name} on http://{host}:{sock.getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        # the engine first: it stops the batch in flight and fails its requests, so the
        # server's shutdown does not wait for them
        await policy.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a transformers model folder (config, weights, tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--model-name", default=None, help="name clients use (default: the folder path)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-batch-rows", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        asyncio.run(
            serve(
                args.model, args.host, args.port, args.model_name,
                device=args.device, dtype=args.dtype, max_batch_rows=args.max_batch_rows,
            )
        )
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
