"""asyncio helpers shared by the search and the engines."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    """asyncio.gather, except that when one awaitable fails the others are cancelled (and
    awaited) before the error is raised: left running, they would go on calling engines and
    the executor for a result nobody reads, even after those are closed."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Owned(Generic[T]):
    """An async generator that its owner (another one) iterates and closes, kept out of the
    event loop's register of generators. When `asyncio.run` ends with an outer generator left
    suspended (a `break` out of `async for`), the loop closes every generator it registered at
    once; an inner one is then being closed by its owner already, and the loop logs
    "aclose(): asynchronous generator is already running". The loop registers a generator when
    it is first iterated (sys.set_asyncgen_hooks' firstiter); that call is made here without
    the hook. The finalizer stays, so one lost without being closed is still closed."""

    def __init__(self, agen: AsyncGenerator[T, None]) -> None:
        self._agen = agen

    def __aiter__(self) -> Owned[T]:
        return self

    def __anext__(self) -> Awaitable[T]:
        firstiter, finalizer = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(None, finalizer)
        try:
            return self._agen.__anext__()  # the hooks run here, on the first call
        finally:
            sys.set_asyncgen_hooks(firstiter, finalizer)

    async def aclose(self) -> None:
        await self._agen.aclose()
