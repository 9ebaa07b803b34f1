"""asyncio helpers shared by the search and the engines."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


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
