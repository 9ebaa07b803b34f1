"""The transformers backend (hf:) on tiny local models: sampling, stops, seeds, batching, PPM."""

from __future__ import annotations

import asyncio
import inspect
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rstar_fast.engines import (  # noqa: E402
    EngineError,
    EngineSpecError,
    EngineUnavailableError,
    SamplingParams,
    load_policy,
    load_ppm,
)
from rstar_fast.engines.hf import HFPPM, HFPolicy  # noqa: E402
from rstar_fast.engines.stops import HFTokenizer, StopMatcher, TextBuilder, token_bytes_table  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _policy(path: Path, **kw) -> HFPolicy:
    policy = load_policy(f"hf:{path}", device="cpu", **kw)
    assert isinstance(policy, HFPolicy)
    return policy


# ---- specs and errors -------------------------------------------------------------------


def test_bad_specs(tmp_path: Path, tiny_policy_path: Path, tiny_ppm_path: Path) -> None:
    with pytest.raises(EngineSpecError, match="needs a model folder"):
        load_policy("hf:")
    with pytest.raises(EngineSpecError, match="does not exist"):
        load_policy(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(EngineSpecError, match="config.json"):
        load_policy(f"hf:{tmp_path}")
    with pytest.raises(EngineSpecError, match="dtype"):
        load_policy(f"hf:{tiny_policy_path}", dtype="int3")
    with pytest.raises(EngineSpecError, match="does not exist"):
        load_ppm(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(EngineSpecError, match="unknown engine"):
        load_policy(f"hugging:{tiny_policy_path}")
    # a folder in the wrong role says which model it holds
    with pytest.raises(EngineSpecError, match=f"hf: {tiny_policy_path} holds a causal LM .*, not a PPM"):
        load_ppm(f"hf:{tiny_policy_path}", device="cpu")
    with pytest.raises(EngineSpecError, match=f"hf: {tiny_ppm_path} holds a sequence classifier .*, not a policy"):
        load_policy(f"hf:{tiny_ppm_path}", device="cpu")
    for device in ("cuda", "mps", "xpu"):
        if not getattr(torch, device).is_available():
            with pytest.raises(EngineUnavailableError, match=f"hf: device '{device}' .* no {device.upper()} device"):
                load_policy(f"hf:{tiny_policy_path}", device=device)


def test_a_gpu_without_an_index_is_the_loading_threads_and_bf16_only_where_native(monkeypatch) -> None:
    """"cuda" (or "auto") names the GPU current where the engine is made: its tensors are made on
    worker threads, which would start on the first GPU while the model sits on another. Before
    Ampere bf16 is emulated (slowly), so "auto" runs fp16 there. (CUDA faked: no GPU here.)"""
    from rstar_fast.engines.hf import _resolve_device, _resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for spec in ("auto", None, "cuda"):
        assert _resolve_device(spec) == torch.device("cuda", 3)
    assert _resolve_device("cuda:1") == torch.device("cuda", 1)
    assert _resolve_device("cpu") == torch.device("cpu")
    # a V100 answers True unless emulation is excluded
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert _resolve_dtype("auto", torch.device("cuda", 3)) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert _resolve_dtype("auto", torch.device("cuda", 3)) == torch.bfloat16


def _without_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of a model folder with its config and weights only."""
    dst.mkdir()
    for file in src.iterdir():
        if not file.name.startswith("tokenizer"):
            shutil.copy(file, dst / file.name)
    return dst


def test_a_folder_without_tokenizer_fails_at_load(tiny_policy_path: Path, tiny_ppm_path: Path,
                                                   tmp_path: Path) -> None:
    for load, src in ((load_policy, tiny_policy_path), (load_ppm, tiny_ppm_path)):
        folder = _without_tokenizer(src, tmp_path / f"{src.name}_bare")
        with pytest.raises(EngineSpecError, match=f"hf: {folder} holds no tokenizer"):
            load(f"hf:{folder}", device="cpu")


async def test_bad_prompts_and_close(tiny_policy_path: Path) -> None:
    policy = _policy(tiny_policy_path)
    with pytest.raises(EngineError, match="outside the model vocabulary"):
        await policy.generate([1, 10**6], SamplingParams(max_tokens=2))
    with pytest.raises(EngineError, match="empty"):
        await policy.generate([], SamplingParams(max_tokens=2))
    await policy.close()
    with pytest.raises(EngineError, match="closed"):
        await policy.generate([1, 2], SamplingParams(max_tokens=2))


def test_tokenizer_is_the_byte_vocabulary(tiny_policy_path: Path) -> None:
    from rstar_fast.engines.tokenizer import ByteTokenizer

    tok = HFTokenizer.from_path(tiny_policy_path)
    ref = ByteTokenizer()
    text = "<|user|>:\nx = 2 * 3 # café\n<end_of_step><end_of_code>"
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(ref.encode(text)) == text
    assert tok.eos_token_id == ref.eos_token_id
    table = token_bytes_table(tok)
    assert table is not None and table[ord("a")] == b"a"
    assert table[ref.special_ids["<end_of_step>"]] == b"<end_of_step>"


# ---- sampling -----------------------------------------------------------------------------


async def test_n_samples_and_lengths(tiny_policy_path: Path) -> None:
    policy = _policy(tiny_policy_path)
    prompt = policy.tokenizer.encode("<|user|>:\nWhat is 2+3?\n<|assistant|>: ")
    out = await policy.generate(prompt, SamplingParams(n=5, temperature=1.0, max_tokens=6, seed=0))
    assert len(out) == 5
    for c in out:
        assert len(c.token_ids) <= 6
        assert c.finish_reason in ("length", "stop")
        # a sample cut by max_tokens ends before a character it stopped part way through (of at
        # most 4 bytes, one token each with the byte tokenizer)
        assert c.finish_reason == "stop" or 6 - 3 <= len(c.token_ids) <= 6
        assert policy.tokenizer.decode(c.token_ids) == c.text
    assert policy.stats.requests == 1 and policy.stats.generated_tokens == sum(len(c.token_ids) if c.sampled is None else c.sampled for c in out)
    await policy.close()


async def test_seeds_are_reproducible(tiny_policy_path: Path) -> None:
    policy = _policy(tiny_policy_path)
    prompt = policy.tokenizer.encode("Let's think step by step")
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1234)
    first = await policy.generate(prompt, params)
    again = await policy.generate(prompt, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    other = await policy.generate(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=99))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    # the same seeded request inside a batch shared with other callers draws the same samples
    crowd = [policy.generate(prompt[:k], SamplingParams(n=2, temperature=1.0, max_tokens=5)) for k in range(3, 9)]
    batched, *_ = await asyncio.gather(policy.generate(prompt, params), *crowd)
    assert [c.token_ids for c in batched] == [c.token_ids for c in first]
    await policy.close()


async def test_many_concurrent_callers_form_batches(tiny_policy_path: Path) -> None:
    policy = _policy(tiny_policy_path)
    tok = policy.tokenizer
    prompts = [tok.encode(f"problem {i}: " + "x" * (i % 5)) for i in range(16)]
    before = policy.batches
    outs = await asyncio.gather(
        *[policy.generate(p, SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=i)) for i, p in enumerate(prompts)]
    )
    assert all(len(o) == 2 for o in outs)
    ran = policy.batches - before
    assert 1 <= ran < 16  # callers were coalesced
    assert policy.largest_batch > 1
    # each result is what the request gets alone (per-request generators, same kernels on CPU)
    alone = await policy.generate(prompts[7], SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=7))
    assert [c.token_ids for c in alone] == [c.token_ids for c in outs[7]]
    await policy.close()


def test_sampling_params_reject_non_finite_values() -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
        with pytest.raises(ValueError, match="top_p"):
            SamplingParams(top_p=bad)


@pytest.mark.parametrize("poison_n", [1, 2])  # with n > 1 its other rows held the bad draw too
async def test_a_failing_request_does_not_fail_its_batch_mates(tiny_policy_path: Path, monkeypatch,
                                                                poison_n: int) -> None:
    policy = _policy(tiny_policy_path)
    tok = policy.tokenizer
    poison = SamplingParams(n=poison_n, max_tokens=4)
    object.__setattr__(poison, "temperature", float("nan"))  # slips past validation: samples no token
    good = [SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=i) for i in range(3)]

    async def together(bad_prompt: str) -> list:
        return await asyncio.gather(
            *[policy.generate(tok.encode(f"q{i}"), p) for i, p in enumerate(good)],
            policy.generate(tok.encode(bad_prompt), poison),
            return_exceptions=True,
        )

    async def check(out: list) -> None:
        for i, (got, p) in enumerate(zip(out[:-1], good)):
            assert not isinstance(got, BaseException), got
            alone = await policy.generate(tok.encode(f"q{i}"), p)
            assert [c.token_ids for c in got] == [c.token_ids for c in alone]

    before = policy.batches
    out = await together("bad")
    assert policy.batches - before == 1  # it failed alone, inside the shared batch
    assert isinstance(out[-1], EngineError) and "sampling found no token (temperature nan" in str(out[-1])
    await check(out)

    # a group whose prefill fails is tried again request by request
    prefill = policy._prefill

    def failing(reqs):
        if any(r.prompt == tok.encode("boom") for r in reqs):
            raise RuntimeError("prefill failed")
        return prefill(reqs)

    monkeypatch.setattr(policy, "_prefill", failing)
    poison = SamplingParams(max_tokens=4)
    out = await together("boom")
    assert isinstance(out[-1], EngineError) and "prefill failed" in str(out[-1])
    await check(out)
    await policy.close()


def _count_decode_steps(policy: HFPolicy) -> list[int]:
    """A one-item list that counts the model's forward passes."""
    steps = [0]
    forward = policy.model.forward

    def counting(*args, **kwargs):
        steps[0] += 1
        return forward(*args, **kwargs)

    policy.model.forward = counting
    return steps


async def _wait_for(steps: list[int], at_least: int) -> None:
    while steps[0] < at_least:
        await asyncio.sleep(0.01)


@pytest.mark.timeout(120)
async def test_a_cancelled_request_stops_generating(tiny_policy_path: Path) -> None:
    policy = _policy(tiny_policy_path)
    tok = policy.tokenizer
    steps = _count_decode_steps(policy)
    long = SamplingParams(temperature=0, max_tokens=3000)  # greedy from "x" meets no EOS in 3000
    task = asyncio.ensure_future(policy.generate(tok.encode("x"), long))
    await _wait_for(steps, 5)
    task.cancel()  # its caller left (serve: the client disconnected)
    (c,) = await policy.generate(tok.encode("ab"), SamplingParams(temperature=0, max_tokens=1))
    assert len(c.token_ids) == 1 and steps[0] < 500
    # closing the engine stops a batch in flight, and its caller hears of it
    task = asyncio.ensure_future(policy.generate(tok.encode("x"), long))
    await _wait_for(steps, steps[0] + 5)
    before = steps[0]
    await policy.close()
    assert steps[0] - before < 500
    with pytest.raises(EngineError, match="closed"):
        await task


@pytest.mark.timeout(120)
@pytest.mark.parametrize("continuous", [True, False])
async def test_a_request_joins_a_running_batch(tiny_policy_path: Path, continuous: bool) -> None:
    """Continuous batching: a short request made while a long one decodes joins its batch and
    returns long before it; with continuous=False it waits for the batch to end. When it
    joined is read on the worker thread, not from the event loop's polling."""
    policy = _policy(tiny_policy_path, continuous=continuous)
    tok = policy.tokenizer
    steps = _count_decode_steps(policy)
    joins = []  # (forward passes so far, steps each joining request waited)
    join = policy._join

    def recording(batch, reqs):
        joins.append((steps[0], [r.waited for r in reqs]))
        return join(batch, reqs)

    policy._join = recording
    long = SamplingParams(temperature=0, max_tokens=300)  # greedy from "x" meets no EOS in 300
    task = asyncio.ensure_future(policy.generate(tok.encode("x"), long))
    await _wait_for(steps, 5)
    short = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11)
    got = await policy.generate(tok.encode("a short one"), short)
    at, (waited,) = joins[-1]
    if continuous:
        assert not task.done() and waited <= HFPolicy.WAIT_STEPS and at < 300, joins
        assert policy.largest_batch == 2
    else:
        assert task.done() and at >= 300, joins  # it joined only once the long one had ended
    (c,) = await task
    assert len(c.token_ids) == 300
    # what it got in the shared batch is what it gets alone
    assert [x.token_ids for x in got] == [x.token_ids for x in await policy.generate(tok.encode("a short one"), short)]
    assert (c.token_ids,) == tuple(x.token_ids for x in await policy.generate(tok.encode("x"), long))
    await policy.close()


async def test_a_cancelled_request_waiting_to_join_is_never_prefilled(tiny_policy_path: Path) -> None:
    policy = _policy(tiny_policy_path)
    prefilled = []
    prefill = policy._prefill

    def spy(reqs):
        prefilled.append([len(r.prompt) for r in reqs])
        return prefill(reqs)

    policy._prefill = spy
    policy.WAIT_STEPS = 10**6  # newcomers wait for the long request to end: time to cancel one
    steps = _count_decode_steps(policy)
    long = asyncio.ensure_future(policy.generate([120], SamplingParams(temperature=0, max_tokens=300)))
    await _wait_for(steps, 3)
    first = asyncio.ensure_future(policy.generate([97], SamplingParams(max_tokens=3)))
    second = asyncio.ensure_future(policy.generate([98] * 500, SamplingParams(n=8, max_tokens=3)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # both wait in the worker's inbox now, the second behind the first
    second.cancel()
    await first
    await long
    assert [1] in prefilled and not any(500 in group for group in prefilled), prefilled
    await policy.close()


async def test_a_failed_join_fails_only_the_newcomers(tiny_policy_path: Path, monkeypatch) -> None:
    from rstar_fast.engines import hf

    merge = hf._Batch.merge

    def failing(self, other):
        if any(len(row.req.prompt) >= 300 for row in other.rows):
            raise RuntimeError("out of memory (while padding the cache to the newcomer's width)")
        return merge(self, other)

    monkeypatch.setattr(hf._Batch, "merge", failing)
    policy = _policy(tiny_policy_path)
    steps = _count_decode_steps(policy)
    long = SamplingParams(temperature=0, max_tokens=600)  # greedy from "x" meets no EOS in 600
    running = asyncio.ensure_future(policy.generate([120], long))
    await _wait_for(steps, 5)
    with pytest.raises(EngineError, match="out of memory"):
        await policy.generate([98] * 300, SamplingParams(max_tokens=5))
    assert not running.done()  # the newcomer tried to join it
    (c,) = await running
    assert len(c.token_ids) == 600
    assert [c.token_ids] == [x.token_ids for x in await policy.generate([120], long)]
    await policy.close()


async def test_a_tiny_temperature_decodes_greedily(tiny_policy_path: Path) -> None:
    """Dividing the logits by 1e-40 overflows them: as vLLM, such a temperature is greedy."""
    policy = _policy(tiny_policy_path)
    prompt = policy.tokenizer.encode("x = 1")
    (greedy,) = await policy.generate(prompt, SamplingParams(temperature=0, max_tokens=6))
    for t in (1e-6, 1e-40):
        (c,) = await policy.generate(prompt, SamplingParams(temperature=t, max_tokens=6, seed=3))
        assert c.token_ids == greedy.token_ids, t
    await policy.close()


async def test_nan_logits_fail_greedy_requests_too(tiny_policy_path: Path) -> None:
    policy = _policy(tiny_policy_path)
    with torch.no_grad():
        policy.model.model.norm.weight.fill_(float("nan"))
    for temperature in (1.0, 0.0):
        with pytest.raises(EngineError, match="sampling found no token"):
            await policy.generate([97, 98], SamplingParams(temperature=temperature, max_tokens=5))
    await policy.close()


async def test_a_ppm_that_gives_nan_fails_instead_of_scoring_nothing(tiny_ppm_path: Path) -> None:
    """The search reads NaN as "not scored": a broken (or overflowing) PPM must say so."""
    ppm = HFPPM(str(tiny_ppm_path), device="cpu")
    with torch.no_grad():
        ppm.head.weight.fill_(float("nan"))
    with pytest.raises(EngineError, match="not a number"):
        await ppm.score([[97, 98], [99]])
    await ppm.close()


async def test_ended_rows_never_pass_the_context(tmp_path: Path) -> None:
    """A row that ends at the context's edge stays in the batch a while; it must not be fed a
    position past the context (GPT-2's position table would be indexed past its end, failing
    its batch mates)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rstar_fast.engines.tokenizer import VOCAB_SIZE, ByteTokenizer, save_hf_tokenizer

    eos = ByteTokenizer().eos_token_id
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    save_hf_tokenizer(tmp_path)
    policy = _policy(tmp_path)
    tok = policy.tokenizer
    long = SamplingParams(n=2, temperature=0, max_tokens=20)
    alone = await policy.generate(tok.encode("a"), long)
    edge, mates = await asyncio.gather(
        policy.generate([97] * 28, SamplingParams(temperature=0, max_tokens=100)),  # 4 tokens left
        policy.generate(tok.encode("a"), long),
    )
    assert len(edge[0].token_ids) <= 4 and [c.token_ids for c in mates] == [c.token_ids for c in alone]
    await policy.close()


def test_an_engine_dropped_without_close_is_freed(tiny_policy_path: Path) -> None:
    """Its worker thread holds the engine only while working: a policy a script forgets to
    close (a checkpoint evaluated per epoch, say) frees its model, and its thread ends."""
    import gc
    import threading
    import time
    import weakref

    policy = _policy(tiny_policy_path)
    asyncio.run(policy.generate([97, 98], SamplingParams(max_tokens=3)))
    worker, model = policy._worker, weakref.ref(policy.model)
    assert worker is not None and worker.is_alive()
    del policy
    gc.collect()
    deadline = time.monotonic() + 10
    while worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()
    assert not worker.is_alive() and model() is None
    assert worker not in threading.enumerate()


async def test_a_ppm_dropped_without_close_on_a_running_loop_is_freed(tiny_ppm_path: Path) -> None:
    """The PPM's batching task lives as long as its event loop (a notebook's, say); it must not
    keep a dropped engine's model alive."""
    import gc
    import weakref

    ppm = load_ppm(f"hf:{tiny_ppm_path}", device="cpu")
    await ppm.score([[97, 98], [99]])
    model = weakref.ref(ppm.backbone)
    del ppm
    gc.collect()
    assert model() is None


async def test_a_ppm_dropped_without_close_ends_its_batching_task_quietly(tiny_ppm_path: Path, caplog) -> None:
    """Before, asyncio destroyed the pending task with "Task was destroyed but it is pending!"."""
    import gc
    import logging
    import threading

    for _ in range(2):
        ppm = load_ppm(f"hf:{tiny_ppm_path}", device="cpu")
        await ppm.score([[97, 98], [99]])
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            del ppm
            gc.collect()
            await asyncio.sleep(0.05)  # the cancelled task ends
            gc.collect()
    assert "destroyed but it is pending" not in caplog.text
    assert not [t for t in threading.enumerate() if t.name.startswith("hf-ppm")]


async def test_closing_a_ppm_mid_batch_leaves_the_event_loop_running(tiny_ppm_path: Path, monkeypatch) -> None:
    """close() waits for the batch on the worker thread off the event loop: the engine's other
    users (a policy, a server on the same loop) keep running meanwhile."""
    import threading

    from rstar_fast.engines.hf import HFPPM

    gate, started = threading.Event(), threading.Event()
    threading.Timer(10, gate.set).start()  # a loop blocked by close() is freed, to fail below

    def held(self, calls):
        started.set()
        gate.wait()
        return [[0.0] * len(seqs) for seqs in calls]

    monkeypatch.setattr(HFPPM, "_score_batch", held)
    ppm = load_ppm(f"hf:{tiny_ppm_path}", device="cpu")
    scoring = asyncio.create_task(ppm.score([[97, 98]]))
    while not started.is_set():
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(ppm.close())
    await asyncio.sleep(0.2)  # the loop runs while the batch does
    assert not closing.done()
    gate.set()
    await closing
    with pytest.raises(EngineError, match="engine closed"):
        await scoring


@pytest.mark.timeout(60)
def test_close_settles_a_request_flushed_from_another_thread(tiny_policy_path: Path) -> None:
    """close() on one thread while another thread's event loop hands the worker a request: the
    request is either served or told the engine closed, never left waiting."""
    import threading

    policy = _policy(tiny_policy_path)
    asyncio.run(policy.generate([97, 98], SamplingParams(max_tokens=2)))  # the worker is up
    gate, flushing = threading.Event(), threading.Event()
    wake = policy._wake

    class Gated:  # holds the other thread's flush just before it takes the lock
        def __enter__(self):
            if threading.current_thread().name == "other":
                flushing.set()
                gate.wait()
            return wake.__enter__()

        def __exit__(self, *exc):
            return wake.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(wake, name)

    policy._wake = Gated()
    outcome = []

    async def call() -> None:
        try:
            await asyncio.wait_for(policy.generate([97, 99], SamplingParams(max_tokens=4)), timeout=10)
            outcome.append("served")
        except EngineError as exc:
            outcome.append(str(exc))
        except asyncio.TimeoutError:
            outcome.append("never settled")

    other = threading.Thread(target=lambda: asyncio.run(call()), name="other")
    other.start()
    flushing.wait()
    asyncio.run(policy.close())
    gate.set()
    other.join()
    assert outcome == [f"{policy.name}: engine closed"]


async def test_requests_joining_at_every_step_get_what_they_get_alone(tiny_policy_path: Path) -> None:
    """Many staggered callers of different lengths: rows join and leave the batch at many steps
    (the cache grows, is left-padded and trimmed) and every request still gets its own samples."""
    policy = _policy(tiny_policy_path, max_batch_rows=12)
    tok = policy.tokenizer
    calls = [(tok.encode(f"caller {i} " + "y" * (i % 7)), SamplingParams(n=1 + i % 3, temperature=1.0,
              max_tokens=3 + (i * 7) % 40, seed=i)) for i in range(24)]

    async def late(i: int) -> list:
        await asyncio.sleep(0.002 * i)
        return await policy.generate(*calls[i])

    together = await asyncio.gather(*[late(i) for i in range(24)])
    assert policy.batches > 1
    for (prompt, params), got in zip(calls, together):
        alone = await policy.generate(prompt, params)
        assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    await policy.close()



async def test_prompts_extending_cached_ones_decode_as_they_do_without_the_cache(tiny_policy_path: Path) -> None:
    """A tree search's prompts: each child's is its parent's plus a step. With the prompt cache
    only their tails are prefilled (hits and misses joining together), and every sample is
    the one the policy gives without the cache."""
    runs = []
    for gib in (2.0, 0.0):
        policy = _policy(tiny_policy_path, prompt_cache_gib=gib)
        tok = policy.tokenizer
        got: list = []
        node = "Ann has 30 apples and buys 12 more. How many apples does she have now? " * 2
        for depth in range(4):
            params = SamplingParams(n=3, temperature=1.0, max_tokens=24, seed=depth)
            kids = [node + c.text + "\n" for c in await policy.generate(tok.encode(node), params)]
            prompts = [*kids, f"an unrelated prompt {depth} " * (depth + 1)]
            outs = await asyncio.gather(*[
                policy.generate(tok.encode(p), SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=10 * depth + i))
                for i, p in enumerate(prompts)])
            got.append([[c.token_ids for c in out] for out in outs])
            node = kids[0]
        runs.append((got, policy.stats.cached_prompt_tokens, policy.stats.prompt_tokens))
        await policy.close()
    (cached_run, cached, total), (plain_run, none, _) = runs
    assert cached_run == plain_run
    assert none == 0 and cached > total // 2


def _kv(blocks: int) -> torch.Tensor:
    """Keys and values of `blocks` blocks of a one-layer model: 64 bytes a position, each
    position's values its own index (so that what comes back can be told apart)."""
    from rstar_fast.engines.prompt_cache import BLOCK

    positions = torch.arange(blocks * BLOCK, dtype=torch.float32)
    return positions[None, None, None, :, None].expand(1, 2, 2, blocks * BLOCK, 4).clone()


def _stored(cache, prompt: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Store `prompt`'s whole blocks that `cache` lacks, as _remember does."""
    from rstar_fast.engines.prompt_cache import BLOCK

    have = cache.cached_blocks(prompt)
    cache.store(prompt, have, _kv(len(prompt) // BLOCK)[:, :, :, have * BLOCK :])


def test_the_prompt_cache_finds_the_longest_cached_prefix_within_its_budget() -> None:
    from rstar_fast.engines.prompt_cache import BLOCK, PromptCache

    cache = PromptCache(max_bytes=64 * 7 * BLOCK)  # 7 blocks
    short = list(range(2 * BLOCK + 5))  # 2 whole blocks kept
    _stored(cache, short)
    assert len(cache) == 2 and cache.nbytes == 64 * 2 * BLOCK
    longer = short[: 2 * BLOCK] + [7] * (2 * BLOCK)
    assert cache.lookup(longer)[1] == 2 * BLOCK
    assert cache.lookup(short[: 2 * BLOCK])[1] == BLOCK  # a tail must be left to prefill
    assert cache.lookup(short[:BLOCK]) is None
    assert cache.lookup([1] + short[1:]) is None  # the first block differs
    _stored(cache, longer)  # shares the first two blocks: only two more are stored
    assert len(cache) == 4 and cache.cached_blocks(longer) == 4 and cache.cached_blocks(longer + [9] * BLOCK) == 4
    blocks, n = cache.lookup(longer + [1])
    assert n == 4 * BLOCK and torch.equal(torch.cat([b.kv for b in blocks], dim=3), _kv(4))
    other = [5] * (4 * BLOCK)  # over budget with the four above: the least recently used go,
    _stored(cache, other)  # the tips before the blocks they extend
    assert cache.nbytes <= cache.max_bytes and len(cache) == 7
    assert cache.lookup(longer + [1])[1] == 3 * BLOCK
    assert cache.lookup(other + [1])[1] == 4 * BLOCK
    _stored(cache, list(range(100 * BLOCK)))  # larger than the whole budget: not kept
    assert len(cache) == 7


def test_siblings_share_their_parents_blocks_and_a_shared_prefix_outlives_its_newest_holder() -> None:
    """Children of one node hold their parent's blocks once; evicting one child leaves the
    prefix to the others; a prefix found again (or seen whole) is refreshed."""
    from rstar_fast.engines.prompt_cache import BLOCK, PromptCache

    cache = PromptCache(max_bytes=64 * 5 * BLOCK)  # 5 blocks
    parent = list(range(2 * BLOCK))
    a, b = parent + [500] * BLOCK, parent + [600] * BLOCK
    _stored(cache, parent)
    _stored(cache, a)
    _stored(cache, b)
    assert len(cache) == 4  # the parent's 2 blocks once, a tip each
    assert cache.lookup(a + [1])[1] == 3 * BLOCK  # b is now the least recently used
    _stored(cache, [7] * (2 * BLOCK))  # evicts b's tip only
    assert cache.cached_blocks(b) == 2 and cache.cached_blocks(a) == 3
    assert cache.lookup(parent + [700] * 5)[1] == 2 * BLOCK

    cache = PromptCache(max_bytes=64 * 2 * BLOCK)  # 2 blocks
    x, y = [1] * BLOCK, [2] * BLOCK
    _stored(cache, x)
    _stored(cache, y)
    assert cache.cached_blocks(x) == 1  # seen again: now newer than y
    _stored(cache, [3] * BLOCK)
    assert cache.cached_blocks(x) == 1 and cache.cached_blocks(y) == 0


def test_a_full_device_empties_the_prompt_cache_instead_of_failing_the_request() -> None:
    """Out of memory while storing (CUDA's error, or the plain RuntimeError of a CPU
    allocation) clears the cache and leaves the request alone."""
    from types import SimpleNamespace

    from rstar_fast.engines.hf import _remember
    from rstar_fast.engines.prompt_cache import BLOCK, PromptCache

    for error in (torch.OutOfMemoryError("CUDA out of memory"),
                  RuntimeError("DefaultCPUAllocator: can't allocate memory")):
        class Full:
            def __getitem__(self, row: int) -> Full:
                return self

            def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
                raise error

        prompts = PromptCache(max_bytes=1 << 20)
        _stored(prompts, list(range(BLOCK)))
        cache = SimpleNamespace(layers=[SimpleNamespace(keys=Full(), values=Full())])
        _remember(prompts, [[7] * (2 * BLOCK)], cache, torch.ones(1, 2 * BLOCK, dtype=torch.long))
        assert len(prompts) == 0 and prompts.nbytes == 0


async def test_out_of_memory_in_a_forward_empties_the_prompt_caches(tiny_policy_path: Path,
                                                                    tiny_ppm_path: Path) -> None:
    """A failed allocation in the model (a prefill, a PPM batch) fails its request and empties
    the engine's prompt cache, whose memory the next request needs; the prompt tokens the
    cache would have served are not counted."""
    policy = _policy(tiny_policy_path)
    ppm = HFPPM(str(tiny_ppm_path), device="cpu")
    prompt = policy.tokenizer.encode("Ann has 30 apples and buys 12 more. " * 4)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    await policy.generate(prompt, params)
    await ppm.score([prompt + [5, 6], prompt + [7]])
    for engine, model in ((policy, policy.model), (ppm, ppm.backbone)):
        assert len(engine.prompt_cache) > 0
        counted = engine.stats.cached_prompt_tokens

        def full(*args: Any, model: Any = model, **kwargs: Any) -> Any:
            del model.forward  # once
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")

        model.forward = full
        with pytest.raises(EngineError, match="allocate"):
            if engine is policy:
                await policy.generate(prompt + [9] * 20, params)
            else:
                await ppm.score([prompt + [9] * 20])
        assert len(engine.prompt_cache) == 0 and engine.prompt_cache.nbytes == 0
        assert engine.stats.cached_prompt_tokens == counted  # nothing ran, nothing was served
    assert len(await policy.generate(prompt, params)) == 1  # the next request runs
    await policy.close()
    await ppm.close()


@pytest.mark.parametrize("gib", [-1.0, float("inf"), "two"])
def test_a_prompt_cache_size_that_is_not_a_finite_size_is_refused(tiny_policy_path: Path, gib: Any) -> None:
    with pytest.raises(EngineSpecError, match="prompt_cache_gib"):
        _policy(tiny_policy_path, prompt_cache_gib=gib)


def test_the_roomy_cache_layer_holds_what_a_dynamic_layer_holds() -> None:
    """Appends in place across room boundaries, after a reorder and after keys set from outside
    (as merge and trim set them), and keeps its room between single-position appends."""
    from transformers.cache_utils import DynamicLayer

    from rstar_fast.engines.hf import ROOM, _roomy_layer

    gen = torch.Generator().manual_seed(0)
    roomy, plain = _roomy_layer()(), DynamicLayer()

    def both(new: int, rows: int = 3) -> None:
        k, v = torch.randn(rows, 2, new, 4, generator=gen), torch.randn(rows, 2, new, 4, generator=gen)
        got, want = roomy.update(k, v), plain.update(k.clone(), v.clone())
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    both(10)
    moves = 0
    for _ in range(2 * ROOM + 5):
        before = roomy.keys.data_ptr()
        both(1)
        moves += roomy.keys.data_ptr() != before
    assert moves <= 2  # a fresh buffer only when the room runs out, not at every step
    for layer in (roomy, plain):
        layer.reorder_cache(torch.tensor([2, 0, 0]))
    both(1)
    for layer in (roomy, plain):  # what trim does: drop leading positions
        layer.keys, layer.values = layer.keys[:, :, 5:], layer.values[:, :, 5:]
    both(1)
    both(7)
    assert roomy.get_seq_length() == plain.get_seq_length() == 10 + 2 * ROOM + 5 + 1 + 1 + 7 - 5


def test_engine_threads_asking_at_once_get_one_roomy_layer_class(monkeypatch) -> None:
    """A cache is mergeable only if its layers are of that very class."""
    import threading

    from rstar_fast.engines import hf

    monkeypatch.setattr(hf, "_roomy", None)
    start = threading.Barrier(8)
    got: list[type] = []

    def ask() -> None:
        start.wait()
        got.append(hf._roomy_layer())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1


def test_decoding_on_a_roomy_cache_matches_the_model_run_without_a_cache(tiny_policy_path: Path) -> None:
    """What the engine's decode steps compute (left-padded prompts, appends in place past the
    room) is what feeding each whole sequence gives."""
    from transformers import AutoModelForCausalLM

    from rstar_fast.engines.hf import ROOM, new_cache

    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy_path)).eval()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (n,), generator=gen).tolist() for n in (3, 30)]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    cache = new_cache(model.config)
    kw = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, **kw)
        for _ in range(ROOM + 10):
            step = out.logits[:, -1].argmax(-1)
            for s, t in zip(seqs, step.tolist()):
                s.append(t)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.tensor([[len(s) - 1] for s in seqs])
            out = model(input_ids=step[:, None], attention_mask=mask, position_ids=positions,
                        use_cache=True, **kw)
            for row, s in enumerate(seqs):
                whole = model(input_ids=torch.tensor([s])).logits[0, -1]
                assert torch.allclose(out.logits[row, -1], whole, atol=1e-4), (row, len(s))
    assert cache.get_seq_length() == width + ROOM + 10

# ---- stop strings (scripted model: greedy output known) ------------------------------------


def _expect(prompt_tail: str) -> str:
    """The scripted model's greedy continuation of a prompt ending in `prompt_tail`."""
    start = ALPHABET.index(prompt_tail[-1]) + 1
    return ALPHABET[start:] + "<end_of_step>"


@pytest.mark.parametrize(
    ("stops", "text", "stop"),
    [
        ((), _expect("p"), None),  # ends on EOS: finish "stop", no stop string, EOS left out
        (("stu",), "qrstu", "stu"),
        (("xyz", "rs"), "qrs", "rs"),  # the stop that ends first wins
        (("<end_of_step>",), _expect("p"), "<end_of_step>"),
        (("tu", "stu"), "qrstu", "stu"),  # same end: the longer stop
    ],
)
async def test_stop_strings_are_exact(scripted_policy_path: Path, stops, text, stop) -> None:
    policy = _policy(scripted_policy_path)
    tok = policy.tokenizer
    out = await policy.generate(tok.encode("count: p"), SamplingParams(n=2, temperature=0, max_tokens=40, stop=stops))
    for c in out:
        assert c.text == text
        assert c.finish_reason == "stop" and c.stop == stop
        assert c.token_ids == tok.encode(text)
    await policy.close()


async def test_stop_inside_a_token_and_length(scripted_policy_path: Path) -> None:
    policy = _policy(scripted_policy_path)
    tok = policy.tokenizer
    prompt = tok.encode("w")
    # "<end_of" ends inside the special token <end_of_step>: the tail is re-encoded as bytes
    (c,) = await policy.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=("z<end_of",)))
    assert c.text == "xyz<end_of" and c.stop == "z<end_of" and c.finish_reason == "stop"
    assert tok.decode(c.token_ids) == c.text and c.token_ids[:3] == tok.encode("xyz")
    # x, y, z and <end_of_step> were sampled, whatever the re-encoded tail's length
    assert c.sampled_count == 4 and len(c.token_ids) > 4 and policy.stats.generated_tokens == 4
    (c,) = await policy.generate(prompt, SamplingParams(temperature=0, max_tokens=2, stop=("zz",)))
    assert (c.text, c.finish_reason, c.stop) == ("xy", "length", None)
    # a stop in the last allowed token still counts as a stop
    (c,) = await policy.generate(prompt, SamplingParams(temperature=0, max_tokens=2, stop=("y",)))
    assert (c.text, c.finish_reason, c.stop) == ("xy", "stop", "y")
    await policy.close()


def _with_context(src: Path, dst: Path, positions: int) -> Path:
    """A copy of a model folder whose config says the context holds `positions` tokens."""
    import json

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (dst / "config.json").write_text(json.dumps(config))
    return dst


async def test_generation_stops_at_the_context(scripted_policy_path: Path, tmp_path: Path) -> None:
    policy = _policy(_with_context(scripted_policy_path, tmp_path / "short", 20))
    assert policy.max_model_len == 20
    tok = policy.tokenizer
    greedy = SamplingParams(n=2, temperature=0, max_tokens=10**6)
    out = await policy.generate(tok.encode("count: a"), greedy)  # 8 prompt tokens, 12 left
    assert [(c.text, c.finish_reason) for c in out] == [("bcdefghijklm", "length")] * 2
    # a prompt that fills the context (or more) gets empty completions, which end the branch
    for prompt in ("count: abcdefghijklm", "count: abcdefghijklmnopqrstuvw"):
        out = await policy.generate(tok.encode(prompt), greedy)
        assert [(c.text, c.token_ids, c.finish_reason, c.stop) for c in out] == [("", [], "length", None)] * 2
    await policy.close()


async def test_mixed_params_share_a_batch(scripted_policy_path: Path) -> None:
    policy = _policy(scripted_policy_path)
    tok = policy.tokenizer
    before = policy.batches
    calls = [
        policy.generate(tok.encode("a"), SamplingParams(temperature=0, max_tokens=3)),
        policy.generate(tok.encode("k"), SamplingParams(temperature=1.0, top_k=1, max_tokens=40, stop=("o",))),
        policy.generate(tok.encode("t"), SamplingParams(n=3, temperature=0.7, top_p=0.5, max_tokens=40, seed=5)),
        policy.generate(tok.encode("x"), SamplingParams(temperature=0, max_tokens=40, stop=("<end_of_step>",))),
    ]
    a, k, t, x = await asyncio.gather(*calls)
    assert policy.batches - before == 1
    assert a[0].text == "bcd" and a[0].finish_reason == "length"
    assert k[0].text == "lmno" and k[0].stop == "o"
    assert [c.text for c in t] == ["uvwxyz<end_of_step>"] * 3
    assert x[0].text == "yz<end_of_step>" and x[0].stop == "<end_of_step>"
    await policy.close()


def test_stop_matcher_and_builder_units(tiny_policy_path: Path) -> None:
    m = StopMatcher(["<end_of_step>", "ab", ""])
    assert m.find(b"xxab", 3) == (4, "ab")
    assert m.find(b"xxab", 4) is None  # ended before the new bytes
    assert m.first_in_text("q <end_of_step> ab") == (15, "<end_of_step>")
    tok = HFTokenizer.from_path(tiny_policy_path)
    b = TextBuilder(tok, token_bytes_table(tok), StopMatcher(["é!"]))
    for i in tok.encode("caf"):
        assert b.push(i) is None
    for i in "é".encode():
        assert b.push(i) is None
    hit = b.push(ord("!"))
    assert hit == (len("café!".encode()), "é!")
    assert b.cut(hit[0]) == ("café!", tok.encode("café!"))
    # re-decoding (no byte table): a stop ending in a character whose bytes came in two tokens
    for stop, end in (("é", 5), ("café", 5)):
        b = TextBuilder(tok, None, StopMatcher([stop]))
        hits = [b.push(i) for i in [*tok.encode("caf"), *"é".encode()]]
        assert hits[-1] == (end, stop), (stop, hits)
    # a sample that ends part way through a character leaves its first bytes out, text and ids alike
    b = TextBuilder(tok, token_bytes_table(tok), StopMatcher(["<end_of_step>"]))
    for i in [*tok.encode("a三"), *"三".encode()[:2]]:
        b.push(i)
    assert b.text().endswith("\ufffd") and b.whole() == ("a三", tok.encode("a三"))
    b.push("三".encode()[2])
    assert b.whole() == ("a三三", tok.encode("a三三"))


# ---- PPM ------------------------------------------------------------------------------------


async def test_ppm_scores_range_and_batching(tiny_ppm_path: Path) -> None:
    ppm = load_ppm(f"hf:{tiny_ppm_path}", device="cpu")
    assert isinstance(ppm, HFPPM) and ppm.layout == "sequence_classification"
    tok = HFTokenizer.from_path(tiny_ppm_path)
    seqs = [tok.encode(f"<|user|>:\nq{i}\n<|assistant|>: " + "# Step 1" * (i % 4)) for i in range(24)]
    alone = [(await ppm.score([s]))[0] for s in seqs[:3]]
    before = ppm.batches
    outs = await asyncio.gather(*[ppm.score(seqs[i : i + 3]) for i in range(0, 24, 3)])
    assert ppm.batches - before < 8
    flat = [v for o in outs for v in o]
    assert len(flat) == 24 and all(-1.0 <= v <= 1.0 for v in flat)
    assert flat[:3] == pytest.approx(alone, abs=1e-5)  # left padding does not change a score
    assert await ppm.score([]) == []
    raw = HFPPM(str(tiny_ppm_path), device="cpu", raw=True)
    (r,) = await raw.score([seqs[0]])
    assert math.tanh(r / 5) == pytest.approx(alone[0], abs=1e-6)
    await raw.close()
    await ppm.close()


async def test_ppm_calls_sharing_a_prefix_score_as_whole_sequences(tiny_ppm_path: Path) -> None:
    """A call's shared prefix runs once and each sequence continues from it: the scores are
    the model's on each whole sequence, whatever the calls batched with it share."""
    from transformers import AutoModelForSequenceClassification

    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 200, (n,), generator=gen).tolist()

    path = ids(40)
    calls = [
        [path + ids(5), path + ids(9), path + ids(1), path + ids(5)],  # a node's children
        [path[:7] + ids(3), path[:7]],  # one sequence is the other's prefix
        [path + ids(4)] * 2,  # the same sequence twice
        [ids(12)],  # alone
        [ids(1), ids(6)],  # nothing shared, and a sequence of one token
    ]
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_ppm_path)).eval()
    with torch.inference_mode():
        want = [[math.tanh(float(model(input_ids=torch.tensor([seq])).logits[0, 0]) / 5) for seq in call]
                for call in calls]
    ppm = load_ppm(f"hf:{tiny_ppm_path}", device="cpu")
    assert ppm.share_prefixes
    got = await asyncio.gather(*(ppm.score(call) for call in calls))
    assert ppm.batches == 1
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    for budget in (1, 60):  # chunks of one call, or of a few
        ppm.max_batch_tokens = budget
        got = await asyncio.gather(*(ppm.score(call) for call in calls))
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-5)
    await ppm.close()
    whole = HFPPM(str(tiny_ppm_path), device="cpu", share_prefixes=False)
    got = await asyncio.gather(*(whole.score(call) for call in calls))
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    await whole.close()


async def test_ppm_calls_down_a_tree_reuse_the_scored_paths(tiny_ppm_path: Path) -> None:
    """Each call scores a node's children; the next call's shared prefix is one of those
    children, found in the prompt cache instead of run again. Scores stay the model's on
    each whole sequence."""
    from transformers import AutoModelForSequenceClassification

    gen = torch.Generator().manual_seed(2)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 200, (n,), generator=gen).tolist()

    node, calls = ids(37), []
    for depth in range(5):
        children = [node + ids(9 + 7 * k + depth) for k in range(3)]
        calls.append(children)
        node = children[depth % 3]
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_ppm_path)).eval()
    with torch.inference_mode():
        want = [[math.tanh(float(model(input_ids=torch.tensor([seq])).logits[0, 0]) / 5) for seq in call]
                for call in calls]
    ppm = load_ppm(f"hf:{tiny_ppm_path}", device="cpu")
    for call, w in zip(calls, want):
        assert await ppm.score(call) == pytest.approx(w, abs=1e-5)
    assert ppm.prompt_cache.hits == len(calls) - 1  # all but the root's call
    assert ppm.stats.cached_prompt_tokens > 0
    await ppm.close()
    with pytest.raises(EngineSpecError, match="prompt_cache_gib"):
        HFPPM(str(tiny_ppm_path), device="cpu", prompt_cache_gib=float("nan"))


def _write_reference_ppm(src: Path, dst: Path, weight_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's released PPM layout: a causal LM folder plus value_head.bin."""
    shutil.copytree(src, dst)
    hidden = 64
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(1, hidden, generator=gen) * weight_scale
    bias = torch.randn(1, generator=gen)
    torch.save({"v_head.summary.weight": weight, "v_head.summary.bias": bias}, dst / "value_head.bin")
    return weight, bias


async def test_ppm_reference_layout(tiny_policy_path: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    folder = tmp_path / "rstar_ppm"
    weight, bias = _write_reference_ppm(tiny_policy_path, folder)
    ppm = load_ppm(f"hf:{folder}", device="cpu")
    assert isinstance(ppm, HFPPM) and ppm.layout == "value_head"
    tok = HFTokenizer.from_path(folder)
    seqs = [tok.encode("<|user|>:\nWhat is 1+1?\n<|assistant|>: <code>"), tok.encode("short")]
    got = await ppm.score(seqs)
    backbone = AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        for seq, value in zip(seqs, got):
            h = backbone(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
            raw = float(h @ weight[0] + bias[0])
            assert value == pytest.approx(math.tanh(raw / 5), abs=1e-5)
    await ppm.close()


def test_ppm_reference_layout_bad_head(tiny_policy_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad_ppm"
    shutil.copytree(tiny_policy_path, folder)
    torch.save({"v_head.summary.weight": torch.zeros(1, 7)}, folder / "value_head.bin")
    with pytest.raises(EngineSpecError, match="value head"):
        load_ppm(f"hf:{folder}", device="cpu")


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
async def test_cuda_policy_and_ppm(scripted_policy_path: Path, tiny_ppm_path: Path) -> None:
    policy = load_policy(f"hf:{scripted_policy_path}", device="cuda", dtype="float32")
    tok = policy.tokenizer
    (c,) = await policy.generate(tok.encode("p"), SamplingParams(temperature=0, max_tokens=40, stop=("stu",)))
    assert c.text == "qrstu" and c.stop == "stu"
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3)
    assert [x.token_ids for x in await policy.generate(tok.encode("m"), params)] == [
        x.token_ids for x in await policy.generate(tok.encode("m"), params)
    ]
    await policy.close()
    ppm = load_ppm(f"hf:{tiny_ppm_path}", device="cuda", dtype="bfloat16")
    scores = await ppm.score([tok.encode("abc"), tok.encode("de")])
    assert all(-1 <= s <= 1 for s in scores)
    await ppm.close()


@pytest.mark.parametrize(
    ("top_k", "top_p", "want"),
    [(-1, 1.0, [100, 200, 300, 400]), (2, 1.0, [0, 0, 429, 571]), (-1, 0.5, [0, 0, 429, 571])],
)
def test_sampling_inverts_each_rows_cdf(top_k: int, top_p: float, want: list[int]) -> None:
    """Evenly spread uniforms land on each token as often as its (filtered) probability says."""
    import torch

    from rstar_fast.engines.hf import _sample

    rows = 1000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().repeat(rows, 1)
    full = lambda v: torch.full((rows,), v)  # noqa: E731
    uniforms = [(i + 0.5) / rows for i in range(rows)]
    picks = _sample(logits, full(1.0), full(top_k if top_k > 0 else 4), full(top_p), uniforms,
                    filtered=full(top_k > 0 or top_p < 1.0))
    assert torch.bincount(picks, minlength=4).tolist() == pytest.approx(want, abs=1)
    # a draw at the very top of [0, 1) picks the last kept token (sorted by probability: 3, 2)
    edge = _sample(logits[:1], full(1.0)[:1], full(2)[:1], full(1.0)[:1], [1 - 2**-53], filtered=full(True)[:1])
    assert edge.item() == 2
    # rows with and without a filter in one batch pick what each picks in a batch of its own kind
    plain = _sample(logits, full(1.0), full(4), full(1.0), uniforms, filtered=full(False))
    cut = _sample(logits, full(1.0), full(2), full(1.0), uniforms, filtered=full(True))
    mixed_rows = torch.arange(rows) % 2 == 0
    mixed = _sample(logits, full(1.0), torch.where(mixed_rows, 2, 4), full(1.0), uniforms, filtered=mixed_rows)
    assert torch.equal(mixed, torch.where(mixed_rows, cut, plain))


def test_a_top_p_that_float32_holds_as_zero_keeps_the_most_likely_token() -> None:
    """SamplingParams takes any top_p > 0; 1e-50 is 0 in float32, and the nucleus still holds
    the most likely token rather than none (which sampled past the vocabulary)."""
    from rstar_fast.engines.hf import _sample

    logits = torch.tensor([0.1, 0.2, 0.4, 0.3]).log().repeat(3, 1)
    full = lambda v: torch.full((3,), v)  # noqa: E731
    picks = _sample(logits, full(1.0), full(4), full(1e-50), [0.0, 0.5, 1 - 2**-53], filtered=full(True))
    assert picks.tolist() == [2, 2, 2]


def test_options_ride_in_the_spec_after_the_folder(tiny_policy_path: Path, tiny_ppm_path: Path, tmp_path: Path) -> None:
    """`hf:FOLDER,key=value,...`, as the CLI's --policy and --ppm take them; the spec wins over a
    keyword option; a folder whose own name holds a comma is taken whole."""
    import shutil

    from rstar_fast.engines import EngineSpecError, load_policy, load_ppm

    policy = load_policy(f"hf:{tiny_policy_path},device=cpu,max_batch_rows=12,continuous=false", max_batch_rows=3)
    assert (policy.device.type, policy.max_batch_rows) == ("cpu", 12)
    ppm = load_ppm(f"hf:{tiny_ppm_path},device=cpu,max_batch_tokens=999,share_prefixes=no")
    assert (ppm.max_batch_tokens, ppm.share_prefixes) == (999, False)
    with pytest.raises(EngineSpecError, match="unknown option 'devce'; expected one of"):
        load_policy(f"hf:{tiny_policy_path},devce=cpu")
    with pytest.raises(EngineSpecError, match="bad value for 'max_batch_rows'"):
        load_policy(f"hf:{tiny_policy_path},max_batch_rows=many")
    odd = tmp_path / "policy,v2"
    shutil.copytree(tiny_policy_path, odd)
    assert load_policy(f"hf:{odd}", device="cpu").path == str(odd)


def test_without_torch_the_engines_name_the_extra(monkeypatch: pytest.MonkeyPatch, tiny_policy_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import fails as if not installed
    for module in ("rstar_fast.engines.hf", "rstar_fast.engines.prompt_cache"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    for load in (load_policy, load_ppm):
        with pytest.raises(EngineUnavailableError, match=r"needs torch and transformers: pip install 'rstar-fast\[hf\]'"):
            load(f"hf:{tiny_policy_path}")


def test_a_tokenizer_without_transformers_names_the_asking_engines_extra(monkeypatch: pytest.MonkeyPatch,
                                                                        tiny_policy_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    for engine, extra in (("openai", "openai"), ("hf", "hf")):
        with pytest.raises(EngineUnavailableError, match=rf"pip install 'rstar-fast\[{extra}\]'"):
            HFTokenizer.from_path(tiny_policy_path, engine)


def test_building_and_loading_a_model_on_a_cpu_says_nothing_of_deepspeed(tmp_path: Path) -> None:
    """DeepSpeed, imported through accelerate where it is installed, would warn that it found no
    GPU: on a machine without one that is no news, and the engines and builders drop it."""
    import importlib.util
    import subprocess
    import sys

    from rstar_fast.engines.hf import accelerator_available

    if importlib.util.find_spec("deepspeed") is None or accelerator_available():
        pytest.skip("needs DeepSpeed installed on a machine without an accelerator")
    script = ("import sys\nfrom rstar_fast.engines.tiny import build_tiny_policy\n"
              "from rstar_fast.engines import load_policy\n"
              "build_tiny_policy(sys.argv[1])\nload_policy('hf:' + sys.argv[1])\n"
              "import deepspeed\nprint('deepspeed imported')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "p")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "deepspeed imported" in done.stdout, done.stderr
    assert "unable to detect" not in done.stderr


def test_a_batcher_busy_on_one_event_loop_refuses_another() -> None:
    # a second loop's request would have replaced the first loop's batching task mid-batch
    import threading

    from rstar_fast.engines import EngineInUseError
    from rstar_fast.engines.hf import Batcher

    gate, running = threading.Event(), threading.Event()

    def run(items: list[int]) -> list[int]:
        running.set()
        gate.wait(30)
        return [2 * i for i in items]

    batcher: Batcher[int, int] = Batcher(run, weight=lambda _: 1, max_weight=8, name="hf test")
    outcome: list[int] = []
    first = threading.Thread(target=lambda: outcome.append(asyncio.run(batcher.submit(3))), daemon=True)
    first.start()
    assert running.wait(30)
    with pytest.raises(EngineInUseError, match="hf test: the engine has requests in flight on another event loop"):
        asyncio.run(batcher.submit(4))
    gate.set()
    first.join(30)
    assert outcome == [6]
    assert asyncio.run(batcher.submit(5)) == 10  # idle: it serves the new loop


async def test_a_tiny_top_p_alone_keeps_only_the_most_likely_token(tiny_policy_path: Path) -> None:
    policy = _policy(tiny_policy_path)
    (greedy,) = await policy.generate([104, 105], SamplingParams(temperature=0, max_tokens=8))
    nucleus = await policy.generate([104, 105], SamplingParams(n=3, temperature=1.0, top_p=1e-6, max_tokens=8, seed=1))
    assert [c.token_ids for c in nucleus] == [greedy.token_ids] * 3
    await policy.close()
