"""``python -m bench.gpu_check``: run the planned sections in order, each inside its time
cap, rewrite the report after each, judge the goals at the end."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

import bench.gpu_check
from bench.common import environment
from bench.gpu_check.clock import Clock
from bench.gpu_check.goals import evaluate_goals
from bench.gpu_check.plan import (
    GPU_PLAN,
    REPORT_RESERVE_S,
    SECTIONS,
    SMOKE_PLAN,
    TOTAL_BUDGET_S,
    CapReached,
    Plan,
)
from bench.gpu_check.report import markdown, write_report
from bench.gpu_check.sections import head, loader, pytest_runs, train, triton_autotune

SectionRunner = Callable[[float, dict[str, Any]], None]


def section_runners(plan: Plan, clock: Clock, out_dir: Path) -> dict[str, SectionRunner]:
    """Each section's ``run`` bound to the plan and clock: ``runner(deadline, out)``."""
    return {
        "head": partial(head.run, plan, clock),
        "triton": partial(triton_autotune.run, plan, clock),
        "train": partial(train.run, plan, clock),
        "loader": partial(loader.run, plan, clock),
        "tests": lambda deadline, out: pytest_runs.run(plan, clock, deadline, out, out_dir),
    }


def run_section(runner: SectionRunner, deadline: float, section: dict[str, Any]) -> None:
    """Run one section into ``section``, recording its status, error and seconds: a
    section that fails or runs out of its cap does not stop the next one."""
    start = time.monotonic()
    try:
        runner(deadline, section)
        section["status"] = "not run" if section.get("not_run") else "ok"
    except CapReached as exc:
        section["status"], section["error"] = "incomplete", str(exc)
    except Exception as exc:
        section["status"] = "failed"
        section["error"] = f"{type(exc).__name__}: {exc}"
        section["traceback"] = traceback.format_exc()
        print(section["traceback"], file=sys.stderr, flush=True)
    section["seconds"] = time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    """The command; its exit status: 0, 1 if a section failed or hit its cap, 2 without
    a CUDA device outside ``--smoke``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=bench.gpu_check.__doc__
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (for make test)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: $GPU_CHECK_OUT or work_dirs/gpu_check; "
        "work_dirs/gpu_check_smoke with --smoke)",
    )
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these"
    )
    args = parser.parse_args(argv)
    default_out = "work_dirs/gpu_check_smoke" if args.smoke else "work_dirs/gpu_check"
    out_dir = args.out or Path(os.environ.get("GPU_CHECK_OUT", default_out))
    if args.smoke:
        plan, device = SMOKE_PLAN, torch.device("cpu")
    elif torch.cuda.is_available():
        plan, device = GPU_PLAN, torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        print("gpu_check: torch sees no CUDA device (--smoke runs on the CPU)", file=sys.stderr)
        return 2
    if args.smoke:
        # Triton's CPU interpreter for the triton section; it must be asked for before
        # anything imports triton (environment() below does).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    clock = Clock(device)
    started = time.monotonic()
    overall_deadline = started + TOTAL_BUDGET_S - REPORT_RESERVE_S
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "smoke": args.smoke,
        "plan": dataclasses.asdict(plan),
        "environment": environment(device),
        "sections": {},
        "goals": [],
        "total_s": 0.0,
        "exit_status": None,
    }
    runners = section_runners(plan, clock, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (s for s in SECTIONS if s in args.sections):
        cap = plan.cap_s(name)
        section: dict[str, Any] = {"status": "running", "cap_s": cap, "error": None}
        report["sections"][name] = section
        print(f"== gpu_check: {name} (cap {cap:.0f} s)", flush=True)
        deadline = min(time.monotonic() + cap, overall_deadline)
        run_section(runners[name], deadline, section)
        report["total_s"] = time.monotonic() - started
        write_report(out_dir, report)
        clock.release()
    report["total_s"] = time.monotonic() - started
    bad = [n for n, s in report["sections"].items() if s["status"] in ("failed", "incomplete")]
    report["exit_status"] = 1 if bad else 0
    report["goals"] = evaluate_goals(report)
    write_report(out_dir, report)
    print(markdown(report))
    print(f"written to {out_dir}/gpu_check.json and gpu_check.md")
    if bad:
        print(f"gpu_check: sections failed or incomplete: {', '.join(bad)}", file=sys.stderr)
    return report["exit_status"]


if __name__ == "__main__":
    raise SystemExit(main())
