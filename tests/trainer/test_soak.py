"""Soak test (``make soak``; marked slow, not in CI): the demo configuration on 2 CPU
ranks for ``SOAK_STEPS`` steps (default 2,000) with a checkpoint every 100, sampling
every worker's resident memory and the logged throughput.

Passes if, after warm-up (the first 20 % of the run), resident memory stops growing
(the last quarter's median is within 64 MiB + 5 % of the second quarter's; medians,
because the final verification briefly adds ~0.9 GiB at the very end) and
throughput does not decay (the last quarter's median is at least 70 % of the second
quarter's; the machine is shared, so the bound is loose). Figures go to
``$SOAK_OUT/soak.json`` (default ``work_dirs/soak``) and are quoted in
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path

import pytest

from tests.torchrun_jobs import ROOT, Job, descendants

STEPS = int(os.environ.get("SOAK_STEPS", "2000"))
DATA = Path(os.environ.get("SOAK_DATA", ROOT / "data/synthetic"))
OUT = Path(os.environ.get("SOAK_OUT", ROOT / "work_dirs/soak"))
LINE = re.compile(r"step (\d+)/\d+ .* samples/s ([\d.]+)")


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _quarter(values: list[tuple[float, float]], q: int) -> list[float]:
    """Values of quarter ``q`` (1-4) of the run, by progress ``x`` in [0, 1]."""
    return [v for x, v in values if (q - 1) / 4 <= x < q / 4 or (q == 4 and x == 1)]


@pytest.mark.slow
def test_soak_memory_flat_and_throughput_steady() -> None:
    if not (DATA / "train.rec").exists():
        pytest.skip(f"no demo data in {DATA}: run `make demo` (or set SOAK_DATA) first")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    epochs = -(-STEPS // 187)  # 187 steps per demo epoch at a global batch of 64
    args = [
        str(ROOT / "train_dist.py"),
        "configs/demo",
        f"data.root={DATA}",
        f"train.output={OUT / 'run'}",
        f"train.epochs={epochs}",
        f"train.max_steps={STEPS}",
        "checkpoint.every_steps=100",
        "eval.at_start=false",
        "log.every_steps=25",
    ]
    samples: list[tuple[float, dict[int, float]]] = []
    started = time.monotonic()
    with Job(["--standalone", "--nproc_per_node=2"], args, OUT / "torchrun.log") as job:
        while job.proc.poll() is None:
            kids = descendants(job.proc.pid)
            rss = {p: r for p in kids if (r := _rss_mib(p)) is not None}
            samples.append((time.monotonic() - started, rss))
            time.sleep(5)
            if time.monotonic() - started > 4 * 3600:
                pytest.fail("soak run exceeded 4 hours")
        code = job.proc.wait()
        tail = job.tail()
    wall = time.monotonic() - started
    assert code == 0, tail

    log = (OUT / "run" / "train.log").read_text()
    speeds = [(int(m[1]), float(m[2])) for m in LINE.finditer(log)]
    speed_by_progress = [(s / STEPS, v) for s, v in speeds]
    # per sample time: the largest process is a rank (the agent and workers are smaller);
    # the sum over all descendants covers every rank and data worker
    total = [(t / wall, sum(r.values())) for t, r in samples if r]
    warm = [(x, v) for x, v in total if x >= 0.2]
    q2, q4 = _quarter(warm, 2), _quarter(warm, 4)
    s2, s4 = _quarter(speed_by_progress, 2), _quarter(speed_by_progress, 4)
    figures = {
        "steps": STEPS,
        "wall_s": round(wall, 1),
        "rss_total_mib": {
            "first_sample": round(total[0][1], 1),
            "after_warmup_min": round(min(v for _, v in warm), 1),
            "q2_median": round(statistics.median(q2), 1),
            "q4_median": round(statistics.median(q4), 1),
            "q2_max": round(max(q2), 1),
            "q4_max": round(max(q4), 1),
            "max": round(max(v for _, v in total), 1),
        },
        "samples_per_s": {
            "q2_median": round(statistics.median(s2), 1),
            "q4_median": round(statistics.median(s4), 1),
            "min": min(v for _, v in speeds),
            "max": max(v for _, v in speeds),
        },
        "checkpoints": sorted(p.name for p in (OUT / "run" / "checkpoints").iterdir()),
        "load_average_end": os.getloadavg(),
    }
    (OUT / "soak.json").write_text(json.dumps(figures, indent=2))
    (OUT / "rss_series.json").write_text(json.dumps(total))
    print(json.dumps(figures, indent=2))
    assert statistics.median(q4) <= statistics.median(q2) * 1.05 + 64, figures
    assert statistics.median(s4) >= 0.7 * statistics.median(s2), figures
