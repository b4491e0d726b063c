"""Fill in ``tools/slurm/train.sbatch`` for a training run (``python -m tools.slurm``).

::

    python -m tools.slurm ms1mv3_r50 data.root=/data/ms1mv3 train.output=/shared/r50 \\
        --nodes 2 --gpus-per-node 8 --partition gpu --time 2-00:00:00 --out r50.sbatch
    sbatch r50.sbatch

Two launchers: ``torchrun`` (default: one agent per node, c10d rendezvous on the first
node's host) or ``srun`` (one Slurm task per rank; the trainer reads ``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_JOB_NODELIST``, see
:func:`common.dist.launch_env`). Every script asks for ``--requeue`` and
``--signal=B:USR1@WARN``: the warning reaches the ranks, which save a checkpoint at the
next log step and exit with code 75, and the script requeues the job, which resumes
(docs/training.md, "Slurm").
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UsageError

TEMPLATE = Path(__file__).with_name("train.sbatch")
ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("torchrun", "srun")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # Slurm's D-HH:MM:SS, HH:MM:SS, MM, ...
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class JobSpec:
    """What one sbatch script asks for; see :func:`render`."""

    train_args: tuple[str, ...]
    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU
    launcher: str = "torchrun"
    partition: str | None = None
    time: str = "1-00:00:00"
    output: str = "slurm-%j.out"
    job_name: str = "partial-fc"
    cpus_per_proc: int = 8
    warn_s: int = 120
    python: str = ".venv/bin/python"
    workdir: str = str(ROOT)
    env: tuple[str, ...] = field(default_factory=tuple)

    @property
    def procs(self) -> int:
        """Ranks per node."""
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.gpus_per_node or 1


def check(spec: JobSpec) -> None:
    """Raise :class:`UsageError` naming the option that is out of range or malformed."""
    if spec.nodes < 1:
        raise UsageError(f"--nodes {spec.nodes}: at least 1")
    if spec.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node {spec.gpus_per_node}: 0 (CPU) or more")
    if spec.procs < 1:
        raise UsageError(f"--procs-per-node {spec.procs}: at least 1")
    if spec.gpus_per_node and spec.procs > spec.gpus_per_node:
        raise UsageError(
            f"--procs-per-node {spec.procs} is more than --gpus-per-node "
            f"{spec.gpus_per_node}: NCCL needs one GPU per rank"
        )
    if spec.launcher not in LAUNCHERS:
        raise UsageError(f"--launcher {spec.launcher!r}: one of {', '.join(LAUNCHERS)}")
    if not _TIME.match(spec.time):
        raise UsageError(f"--time {spec.time!r}: Slurm's D-HH:MM:SS, HH:MM:SS or minutes")
    if spec.cpus_per_proc < 1:
        raise UsageError(f"--cpus-per-proc {spec.cpus_per_proc}: at least 1")
    if spec.warn_s < 1:
        raise UsageError(f"--warn-s {spec.warn_s}: at least 1 second")
    for option, value in (
        ("--partition", spec.partition or "x"),
        ("--output", spec.output),
        ("--job-name", spec.job_name),
    ):
        if not value or any(c.isspace() for c in value):
            raise UsageError(f"{option} {value!r}: no spaces in an #SBATCH value")
    for item in spec.env:
        if not _ENV.match(item):
            raise UsageError(f"--env {item!r}: NAME=VALUE")
    if not spec.train_args:
        raise UsageError("CONFIG: the training config to run (a preset or a file)")


def render(spec: JobSpec, template: str | None = None) -> str:
    """The sbatch script for ``spec`` (``template``: the text of ``train.sbatch``)."""
    check(spec)
    text = TEMPLATE.read_text() if template is None else template
    tasks = 1 if spec.launcher == "torchrun" else spec.procs
    cpus = spec.cpus_per_proc * (spec.procs if spec.launcher == "torchrun" else 1)
    extra = []
    if spec.partition:
        extra.append(f"#SBATCH --partition={spec.partition}")
    if spec.gpus_per_node:
        extra.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    values = {
        "JOB_NAME": spec.job_name,
        "NODES": str(spec.nodes),
        "TASKS_PER_NODE": str(tasks),
        "CPUS_PER_TASK": str(cpus),
        "TIME": spec.time,
        "OUTPUT": spec.output,
        "WARN_S": str(spec.warn_s),
        "EXTRA_SBATCH": "\n".join(extra),
        "WORKDIR": shlex.quote(spec.workdir),
        "LAUNCHER": spec.launcher,
        "PROCS_PER_NODE": str(spec.procs),
        "PYTHON": shlex.quote(spec.python),
        "OMP_THREADS": str(spec.cpus_per_proc),
        "ENV_EXPORTS": "\n".join(
            f"export {k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in spec.env)
        ),
        "TRAIN_ARGS": " ".join(shlex.quote(a) for a in spec.train_args),
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise UsageError(f"{TEMPLATE}: unknown placeholder(s) {', '.join(sorted(set(left)))}")
    return re.sub(r"\n{3,}", "\n\n", text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.slurm",
        description="Write an sbatch script that trains CONFIG on Slurm (torchrun or srun).",
    )
    p.add_argument("config", help="training config (preset or file), as for train_dist.py")
    p.add_argument("overrides", nargs="*", help="key=value overrides for train_dist.py")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: a CPU job (gloo)")
    p.add_argument("--procs-per-node", type=int, help="ranks per node (default: the GPUs, or 1)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    p.add_argument("--partition")
    p.add_argument("--time", default="1-00:00:00", help="Slurm time limit (D-HH:MM:SS)")
    p.add_argument("--output", default="slurm-%j.out", help="Slurm's log file (%%j: job id)")
    p.add_argument("--job-name", default="partial-fc")
    p.add_argument("--cpus-per-proc", type=int, default=8, help="CPU cores per rank")
    p.add_argument("--warn-s", type=int, default=120, help="preemption warning (USR1) lead, s")
    p.add_argument("--python", default=".venv/bin/python", help="interpreter on the nodes")
    p.add_argument("--workdir", default=str(ROOT), help="this repository on the nodes")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE to export (repeat)")
    p.add_argument("--out", type=Path, help="write the script here (default: stdout)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec = JobSpec(
        train_args=(args.config, *args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node,
        launcher=args.launcher,
        partition=args.partition,
        time=args.time,
        output=args.output,
        job_name=args.job_name,
        cpus_per_proc=args.cpus_per_proc,
        warn_s=args.warn_s,
        python=args.python,
        workdir=args.workdir,
        env=tuple(args.env),
    )
    script = render(spec)
    if args.out is None:
        sys.stdout.write(script)
    else:
        args.out.write_text(script)
        args.out.chmod(0o755)
        print(f"wrote {args.out}: sbatch {args.out}", file=sys.stderr)
    return 0
