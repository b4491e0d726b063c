"""The tests section: ``pytest -m gpu`` over the suite, then the head, optimizer,
trainer and triton-head tests on the check's device (``--device``), each run bounded by
what is left of the section's cap, its output logged to the report's directory."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT
from bench.gpu_check.clock import Clock
from bench.gpu_check.plan import Plan, check_cap

ON_DEVICE_TEST_FILES = (
    "tests/partial_fc/test_partial_fc_head.py",
    "tests/partial_fc/test_partial_fc_optim.py",
    "tests/trainer/test_trainer.py",
    # the triton backend's kernels compiled, against the reference
    "tests/partial_fc/test_triton_head.py",
)
# pytest's closing line: "3 passed, 1 skipped in 9.1s", "12 tests collected in 1.0s", ...
_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?|tests? collected)")


def pytest_runs(plan: Plan, clock: Clock) -> list[tuple[str, list[str]]]:
    """(name, argv) of each pytest run: the gpu-marked tests, then
    :data:`ON_DEVICE_TEST_FILES` on the check's device. The smoke run only collects
    (`make test` runs the suite)."""
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    extra = ["--collect-only"] if plan.tests_collect_only else []
    device = "cuda" if clock.cuda else "cpu"
    return [
        ("tests marked gpu", [*base, "-m", "gpu", *extra, "tests"]),
        (
            f"head, optimizer, trainer and triton-head tests on {device}",
            [*base, "-m", "not slow", "--device", device, *extra, *ON_DEVICE_TEST_FILES],
        ),
    ]


def run_bounded(argv: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """Run ``argv`` from the project root with output to ``log``; on timeout its whole
    process group (pytest and the ranks it spawned) is killed. ``(returncode or None on
    timeout, the output's last summary line)``."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            argv, cwd=PROJECT_ROOT, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    summary = next((line for line in reversed(lines) if _SUMMARY.search(line)), "")
    return rc, summary.strip("= ")


def run(plan: Plan, clock: Clock, deadline: float, out: dict[str, Any], out_dir: Path) -> None:
    """The pytest runs, each bounded by what is left of the cap; logs to ``out_dir``."""
    if importlib.util.find_spec("pytest") is None:
        out["not_run"] = f"pytest missing from {sys.executable}"
        return
    runs: list[dict[str, Any]] = out.setdefault("runs", [])
    failed = []
    for index, (name, argv) in enumerate(pytest_runs(plan, clock)):
        check_cap(deadline, name)
        log = out_dir / f"pytest_{index + 1}.log"
        start = time.perf_counter()
        rc, summary = run_bounded(argv, deadline - time.monotonic(), log)
        ok = rc == 0
        runs.append(
            dict(
                name=name,
                command=shlex.join(["python", *argv[1:]]),
                returncode=rc,
                status="passed" if ok else ("timed out" if rc is None else "failed"),
                summary=summary,
                seconds=time.perf_counter() - start,
                log=log.name,
            )
        )
        if not ok:
            failed.append(f"{name}: {runs[-1]['status']} ({summary or 'see ' + log.name})")
    if failed:
        raise RuntimeError("; ".join(failed))
