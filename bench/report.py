"""The results table: figures, ratios, targets; console, Markdown and a PNG chart."""

from __future__ import annotations

import operator
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

Better = Literal["lower", "higher"]

TIMES = "\u00d7"  # multiplication sign

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
}


@dataclass
class Row:
    """One figure for both proxies.

    ``stowage``/``distribution`` are the figures in ``unit``; ``reference`` is what the
    ratio divides by (direct pull, nginx, one cold client). The target and the comparison
    with Distribution apply to the ratio when there is one, else to the figure.
    """

    key: str
    name: str
    unit: str
    stowage: float | None
    distribution: float | None
    reference: float | None = None
    reference_name: str = ""
    stowage_ratio: float | None = None
    distribution_ratio: float | None = None
    target_op: str | None = None
    target: float | None = None
    better: Better = "lower"
    chart: bool = False  # plot the ratio in the PNG
    note: str = ""

    def subject(self, which: str) -> float | None:
        if which == "stowage":
            return self.stowage_ratio if self.stowage_ratio is not None else self.stowage
        return self.distribution_ratio if self.distribution_ratio is not None else self.distribution

    @property
    def target_text(self) -> str:
        if self.target_op is None or self.target is None:
            return "—"
        sym = {"<=": "≤", ">=": "≥", "==": "="}[self.target_op]
        suffix = TIMES if self.stowage_ratio is not None else f" {self.unit}"
        return f"{sym} {fmt_num(self.target)}{suffix}"

    def meets(self, which: str = "stowage") -> bool | None:
        value = self.subject(which)
        if value is None or self.target_op is None or self.target is None:
            return None
        return _OPS[self.target_op](round(value, 6), self.target)

    def beats_distribution(self) -> bool | None:
        """True when stowage's figure is better; None when either is missing or they tie."""
        s, d = self.subject("stowage"), self.subject("distribution")
        if s is None or d is None or s == d:
            return None
        return s < d if self.better == "lower" else s > d

    def versus(self) -> str:
        s, d = self.subject("stowage"), self.subject("distribution")
        if s is None or d is None:
            return "—"
        if s == d:
            return "= tie"
        return _mark(self.beats_distribution())


@dataclass
class Report:
    rows: list[Row]
    command: str
    date: str
    machine: dict[str, str]
    notes: list[str] = field(default_factory=list)
    profile: str = ""
    quick: bool = False


def fmt_num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit in ("GETs",) or (float(v).is_integer() and abs(v) >= 100):
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}{TIMES}"


def _mark(ok: bool | None) -> str:
    return {True: "✅ yes", False: "❌ no", None: "—"}[ok]


def _cells(row: Row) -> list[str]:
    ref = (
        f"{fmt_num(row.reference, row.unit)} ({row.reference_name})" if row.reference_name else "—"
    )
    return [
        row.key,
        f"{row.name} [{row.unit}]",
        ref,
        fmt_num(row.stowage, row.unit),
        _ratio(row.stowage_ratio),
        fmt_num(row.distribution, row.unit),
        _ratio(row.distribution_ratio),
        row.target_text,
        _mark(row.meets()),
        row.versus(),
    ]


HEADERS = [
    "#",
    "figure",
    "reference",
    "stowage",
    "ratio",
    "Distribution proxy",
    "ratio",
    "target (stowage)",
    "stowage meets target",
    "stowage better than Distribution",
]


def print_table(report: Report, console: Console) -> None:
    table = Table(title="stowage benchmarks" + (" (--quick)" if report.quick else ""))
    for h in HEADERS:
        table.add_column(h, overflow="fold")
    for row in report.rows:
        table.add_row(*_cells(row))
    console.print(table)
    for note in report.notes:
        if note:
            console.print(f"note: {note}")


def summary(report: Report) -> tuple[int, int, int, int]:
    met = sum(1 for r in report.rows if r.meets() is True)
    targets = sum(1 for r in report.rows if r.meets() is not None)
    beats = sum(1 for r in report.rows if r.beats_distribution() is True)
    compared = sum(1 for r in report.rows if r.versus() != "—")
    return met, targets, beats, compared


def markdown(report: Report, chart_name: str | None) -> str:
    lines = [
        START,
        "",
        f"Run of {report.date}"
        + (" (**--quick**: small sizes, not a result)" if report.quick else ""),
        "",
        "```sh",
        report.command,
        "```",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for row in report.rows:
        cells = [c.replace("|", "\\|") for c in _cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    met, targets, beats, compared = summary(report)
    lines += [
        "",
        f"stowage meets **{met} of {targets}** targets and is better than Distribution's proxy "
        f"on **{beats} of {compared}** figures in this run.",
        "",
    ]
    notes = [r for r in report.rows if r.note]
    if notes or report.notes:
        lines.append("Notes on this run:")
        lines.append("")
        lines += [f"- {r.key}: {r.note}" for r in notes]
        lines += [f"- {n}" for n in report.notes if n]
        lines.append("")
    if chart_name:
        lines += [f"![ratios of this run]({chart_name})", ""]
    lines += ["Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    lines.append("")
    if report.profile:
        lines += [
            "Profile of stowage during one extra cold pull of the big image "
            "(`--profile`: py-spy, all threads):",
            "",
            "```",
            report.profile.rstrip(),
            "```",
            "",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, report: Report, chart_name: str | None) -> None:
    block = markdown(report, chart_name)
    if path.exists():
        text = path.read_text()
        if START in text and END in text:
            before, rest = text.split(START, 1)
            _, after = rest.split(END, 1)
            path.write_text(before + block.rstrip("\n") + after)
            return
    path.write_text("# Benchmarks\n\n" + block)


def chart(path: Path, report: Report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.chart and r.stowage_ratio is not None]
    labels = [f"{r.key} {r.name}" for r in rows]
    s = [r.stowage_ratio or 0.0 for r in rows]
    d = [r.distribution_ratio or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.8))
    y = list(range(len(rows)))
    h = 0.38
    ax.barh([i - h / 2 for i in y], s, height=h, label="stowage", color="#2a7ab9")
    ax.barh([i + h / 2 for i in y], d, height=h, label="Distribution proxy", color="#c0504d")
    for i, r in enumerate(rows):
        if r.target is not None:
            ax.plot([r.target, r.target], [i - 0.45, i + 0.45], color="black", lw=2)
        for off, v in ((-h / 2, s[i]), (h / 2, d[i])):
            ax.text(v, i + off, f" {v:.2f}{TIMES}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    values = [v for v in s + d + [r.target or 1.0 for r in rows] if v > 0] or [1.0]
    lo, hi = min(values) / 1.3, max(values) * 1.6
    ticks = [t for t in (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50) if lo <= t <= hi]
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{TIMES}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("ratio to the reference (log scale; black tick = stowage target)")
    title = "stowage vs CNCF Distribution proxy — " + report.date
    ax.set_title(title + (" (--quick)" if report.quick else ""), fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- machine facts --------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0] if out else "?"


def machine_facts() -> dict[str, str]:
    cpu = "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = m[1] if m else "?"
    mem = "?"
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        m = re.search(r"^MemTotal:\s+(\d+) kB", meminfo.read_text(), re.MULTILINE)
        mem = f"{int(m[1]) / 1024 / 1024:.1f} GiB" if m else "?"
    osname = "?"
    osrel = Path("/etc/os-release")
    if osrel.exists():
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)', osrel.read_text(), re.MULTILINE)
        osname = m[1] if m else "?"
    import aiohttp

    from stowage import __version__

    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "memory": mem,
        "OS": f"{osname}, kernel {platform.release()}",
        "Python": f"{platform.python_version()}, aiohttp {aiohttp.__version__}",
        "stowage": f"{__version__} (commit {commit}, uncommitted changes may apply)",
        "docker-registry": _first_line(["docker-registry", "--version"]),
        "nginx": _first_line(["nginx", "-v"]),
        "containerd": _first_line(["containerd", "--version"]),
        "curl": _first_line(["curl", "--version"]),
        "wrk": _first_line(["wrk", "-v"]) if shutil.which("wrk") else "not installed",
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
