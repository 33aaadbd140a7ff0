"""Retry pacing and waiting (the operator's and agent's loops), and the per-registry pace
of tag checks."""

from __future__ import annotations

import asyncio
import time

from stowage.operator.controller import Pacer
from stowage.timing import backoff, wait_any


def test_backoff_doubles_to_a_ceiling_with_jitter() -> None:
    for attempt, base in ((1, 5.0), (2, 10.0), (3, 20.0), (8, 600.0), (30, 600.0)):
        delays = [backoff(attempt, 5.0, 600.0) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays), (attempt, delays[:3])
        assert len(set(delays)) > 1  # jittered


async def test_wait_any_returns_on_the_first_event_or_the_timeout() -> None:
    first, never = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, first.set)
    started = time.monotonic()
    await wait_any(first.wait, never.wait, seconds=5)
    assert time.monotonic() - started < 1
    started = time.monotonic()
    await wait_any(never.wait, seconds=0.1)
    assert 0.09 <= time.monotonic() - started < 1


async def test_tag_checks_are_paced_per_registry() -> None:
    pacer = Pacer(0.5)
    started = time.monotonic()
    await asyncio.gather(*(pacer.wait("docker.io") for _ in range(3)), pacer.wait("ghcr.io"))
    took = time.monotonic() - started
    # Three checks of one registry need two intervals; another registry does not wait.
    assert 0.95 <= took < 3.0, took
    started = time.monotonic()
    await pacer.wait("ghcr.io")  # its last check was at the start: due by now
    assert time.monotonic() - started < 0.4
