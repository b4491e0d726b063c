"""The GPU check's goals (``goals.toml``), judged against the figures of a report.

A goal is judged only on a figure measured at its own configuration; where there is
none (another size, the CPU smoke run, a section that did not run) it is "not measured".
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

GOALS_FILE = Path(__file__).with_name("goals.toml")

# Rows written before the triton backend existed carry no backend: they are torch's.
ROW_DEFAULTS: dict[str, Any] = {"backend": "torch"}

# How each judged figure reads in the report, from the row that holds it.
MEASURED_FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "head_over_bare": lambda r: (
        f"{r['head_over_bare']:.2f}x ({r['head_s'] * 1e3:.2f} vs {r['bare_s'] * 1e3:.2f} ms)"
    ),
    "head_mem_over_grad": lambda r: f"{r['head_mem_over_grad']:.2f}x ({r['head_mem_mib']:.0f} MiB)",
    "head_extra_mib": lambda r: f"{r['head_extra_mib']:.0f} MiB",
    "img_s": lambda r: f"{r['img_s']:,.0f} img/s",
    "total_s": lambda r: f"{r['total_s']:.0f} s",
}

_FIELDS = {
    "issue", "goal", "target", "section", "where", "pick", "figure", "detail",
    "at_most", "at_least", "gpu_only",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Goal:
    """One goal of ``goals.toml`` (its comments explain each field)."""

    key: str
    issue: int
    goal: str
    target: str
    section: str | None
    where: dict[str, Any]
    pick: str
    figure: str
    detail: str | None
    limit: float
    at_least: bool
    gpu_only: bool

    def passes(self, value: float) -> bool:
        """Whether ``value`` meets the goal."""
        return value >= self.limit if self.at_least else value <= self.limit

    def matches(self, row: dict[str, Any]) -> bool:
        """Whether ``row`` was measured at this goal's configuration."""
        return all(row.get(k, ROW_DEFAULTS.get(k)) == v for k, v in self.where.items())


def parse_goal(key: str, entry: dict[str, Any]) -> Goal:
    """One table of ``goals.toml`` as a :class:`Goal`; ``ValueError`` naming the goal
    when a field is unknown, missing or inconsistent."""
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"goal {key}: unknown fields {sorted(unknown)}")
    missing = {"issue", "goal", "target", "figure"} - set(entry)
    if missing:
        raise ValueError(f"goal {key}: missing fields {sorted(missing)}")
    if ("at_most" in entry) == ("at_least" in entry):
        raise ValueError(f"goal {key}: needs exactly one of at_most and at_least")
    if entry["figure"] not in MEASURED_FORMATS:
        raise ValueError(
            f"goal {key}: figure {entry['figure']!r} has no format in MEASURED_FORMATS"
        )
    pick = entry.get("pick", "first")
    if pick not in ("first", "highest"):
        raise ValueError(f"goal {key}: pick must be 'first' or 'highest', got {pick!r}")
    limit = float(entry.get("at_most", entry.get("at_least")))
    if not math.isfinite(limit):
        raise ValueError(f"goal {key}: the limit must be finite, got {limit}")
    return Goal(
        key=key,
        issue=int(entry["issue"]),
        goal=entry["goal"],
        target=entry["target"].format(limit=limit, limit_min=limit / 60),
        section=entry.get("section"),
        where=dict(entry.get("where", {})),
        pick=pick,
        figure=entry["figure"],
        detail=entry.get("detail"),
        limit=limit,
        at_least="at_least" in entry,
        gpu_only=bool(entry.get("gpu_only", False)),
    )


@cache
def load_goals(path: Path = GOALS_FILE) -> dict[str, Goal]:
    """The goals of ``path`` by key, in the file's order."""
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    return {key: parse_goal(key, entry) for key, entry in data.items()}


def _measured_row(goal: Goal, report: dict[str, Any]) -> dict[str, Any] | None:
    """The row holding the goal's figure, or None when nothing was measured there."""
    if goal.section is None:
        return report
    rows = [r for r in report["sections"].get(goal.section, {}).get("rows", []) if goal.matches(r)]
    if goal.pick == "highest":
        rows = [r for r in rows if r.get(goal.figure) is not None]
        return max(rows, key=lambda r: r[goal.figure], default=None)
    return rows[0] if rows else None


def judge(goal: Goal, report: dict[str, Any]) -> dict[str, Any]:
    """The report's goal entry: ``goal``, ``target``, ``measured`` and ``status``
    (``pass``, ``FAIL`` or ``not measured``)."""
    row = _measured_row(goal, report)
    value = None if row is None else row.get(goal.figure)
    if value is None:
        return dict(
            goal=goal.goal, target=goal.target, measured="not measured", status="not measured"
        )
    measured = MEASURED_FORMATS[goal.figure](row)
    if goal.detail is not None:
        measured += f" ({goal.detail}={row[goal.detail]})"
    status = "pass" if goal.passes(value) else "FAIL"
    return dict(goal=goal.goal, target=goal.target, measured=measured, status=status)


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal against the figure measured at its own configuration, if there is one;
    goals of the GPU run only are left out of a smoke run's report."""
    return [
        judge(goal, report)
        for goal in load_goals().values()
        if not (goal.gpu_only and report["smoke"])
    ]
