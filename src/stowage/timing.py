"""Waiting and retrying, as the operator's and the agent's loops do it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any


def backoff(attempt: int, low: float, high: float) -> float:
    """Seconds before retry number ``attempt`` (1, 2, …): ``low`` doubling up to ``high``,
    with ±20 % jitter so that failures started together do not retry together."""
    return min(high, low * 2.0 ** (attempt - 1)) * random.uniform(0.8, 1.2)


async def wait_any(*waits: Callable[[], Awaitable[Any]], seconds: float) -> None:
    """Return when the first of ``waits`` (e.g. ``event.wait``) completes, or after
    ``seconds``; the others are cancelled."""
    tasks = [asyncio.ensure_future(wait()) for wait in waits]
    try:
        await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
