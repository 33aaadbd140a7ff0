"""Every command's metrics are exposed without ``*_created`` series (noise on each scrape),
whichever of them a process imports: each is checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "make",
    [
        "from stowage.proxy.metrics import Metrics as M",
        "from stowage.operator.metrics import OperatorMetrics as M",
        "from stowage.agent.prepull import AgentMetrics as M",
    ],
)
def test_no_created_series(make: str) -> None:
    code = f"{make}\nfrom prometheus_client import generate_latest\n" + (
        "print(generate_latest(M().registry).decode())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "_total" in out.stdout
    assert "_created" not in out.stdout, out.stdout
