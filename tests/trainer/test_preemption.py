"""Preemption under an srun-like launch (issue #29, Slurm): two CPU ranks started as
Slurm tasks (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_JOB_NODELIST``,
no torchrun variables). Rank 1 alone gets SIGUSR1 (``--signal=USR1@120``) just before
step 3; both ranks agree at the next log step (4), save a checkpoint there and exit
with :data:`trainer.preemption.PREEMPTED_EXIT_CODE`; the rerun (the requeued job)
resumes at step 4 and finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from common.dist import DistContext
from tests.torchrun_jobs import ROOT, final_state, free_port, tiny_dataset, train_args
from trainer.preemption import (
    PREEMPTED_EXIT_CODE,
    PREEMPTION_SIGNALS,
    Preempted,
    PreemptionFlag,
)

BATCH = 4  # per rank: 2 ranks -> 8 steps per epoch, 2 epochs -> 16 steps
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "LOCAL_WORLD_SIZE")


def _srun(args: list[str], log_dir: Path, fault: str | None, timeout: float = 300) -> list[int]:
    """Start ``args`` as 2 Slurm tasks on this host (what ``srun -n 2`` sets); their
    exit codes."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    base.pop("PFC_FAULT", None)
    base.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="4242",
        MASTER_PORT=str(free_port()),
    )
    if fault:
        base["PFC_FAULT"] = fault
    procs = []
    logs = []
    try:
        for task in range(2):
            env = {**base, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)}
            fh = open(log_dir / f"task{task}.log", "wb")  # closed below
            logs.append(fh)
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT
                )
            )
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for fh in logs:
            fh.close()


def test_sigusr1_saves_exits_75_and_the_rerun_resumes(tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = train_args(data, out, BATCH, "log.every_steps=2", "checkpoint.resume=auto")
    args[0] = str(ROOT / "tests" / "fault_entry.py")

    codes = _srun(args, tmp_path, "signal:3:1")
    logs = "\n".join((tmp_path / f"task{t}.log").read_text() for t in range(2))
    assert codes == [PREEMPTED_EXIT_CODE] * 2, logs[-4000:]
    assert "preempted (a peer rank's signal) at step 4" in logs  # rank 0 had no signal
    assert f"exit code {PREEMPTED_EXIT_CODE}" in logs
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert any(name.endswith("00000004") for name in saved), saved
    assert not (out / "backbone.pt").exists()  # not finished: nothing exported

    codes = _srun(args[:], tmp_path, None)
    logs = "\n".join((tmp_path / f"task{t}.log").read_text() for t in range(2))
    assert codes == [0, 0], logs[-4000:]
    train_log = (out / "train.log").read_text()
    assert "starting at step 4" in train_log, train_log[-3000:]
    assert int(final_state(out)["step"]) == 16


def test_flag_notes_either_signal_and_restores_handlers() -> None:
    flag = PreemptionFlag()
    before = signal.getsignal(signal.SIGUSR1)
    assert flag.install()
    assert set(PREEMPTION_SIGNALS) == {signal.SIGTERM, signal.SIGUSR1}
    try:
        assert not flag.requested(DistContext())
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested(DistContext()) and flag.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.signal_name == "SIGUSR1"
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) is before
    message = str(Preempted(7, "SIGUSR1", "/x/checkpoints/step-00000007"))
    assert message.startswith("preempted (SIGUSR1) at step 7") and "resume=auto" in message
