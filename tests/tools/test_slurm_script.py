"""``python -m tools.slurm`` fills in ``tools/slurm/train.sbatch`` (issue #29, Slurm):
the generated script's content for both launchers, that bash parses it, and one-line
errors naming the option."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from common.cli import run_main
from common.errors import UsageError
from tools.slurm import JobSpec, main, render


def _lines(script: str, prefix: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(prefix)]


def test_torchrun_script_asks_for_the_allocation_and_requeues(tmp_path: Path) -> None:
    out = tmp_path / "job.sbatch"
    argv = [
        "ms1mv3_r50",
        "data.root=/data/ms 1mv3",
        "train.output=/shared/r50",
        "--nodes=4",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=2-00:00:00",
        "--output=/logs/%j.out",
        "--env=NCCL_SOCKET_IFNAME=ib0",
        f"--out={out}",
    ]
    assert main(argv) == 0
    script = out.read_text()
    assert _lines(script, "#SBATCH") == [
        "#SBATCH --job-name=partial-fc",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",  # one torchrun agent per node
        "#SBATCH --cpus-per-task=64",  # 8 ranks x 8 cores
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --output=/logs/%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=8",
    ]
    assert "LAUNCHER=torchrun" in script and "PROCS_PER_NODE=8" in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$PORT"' in script
    assert "export NCCL_SOCKET_IFNAME=ib0" in script
    # the training arguments survive the shell: quoted where they need it
    assert "train_dist.py ms1mv3_r50 'data.root=/data/ms 1mv3' train.output=/shared/r50" in script
    assert "scontrol requeue" in script and '"$CODE" -eq 75' in script
    assert "@" not in script.replace("USR1@120", "")  # every placeholder filled in
    subprocess.run(["bash", "-n", str(out)], check=True)


def test_srun_script_runs_one_task_per_rank() -> None:
    spec = JobSpec(
        ("configs/demo",), nodes=1, gpus_per_node=0, procs_per_node=2, launcher="srun",
        cpus_per_proc=1, warn_s=30, time="10:00",
    )  # fmt: skip
    script = render(spec)
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH --signal=B:USR1@30" in script
    assert not _lines(script, "#SBATCH --gpus") and not _lines(script, "#SBATCH --partition")
    assert 'srun --kill-on-bad-exit=1 "$PYTHON" train_dist.py configs/demo &' in script
    assert "FORWARD=USR1" in script  # the tasks are the trainers: they catch USR1
    assert shlex.split("x " + script.split("cd ", 1)[1].splitlines()[0])[1] == spec.workdir
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["c", "--nodes=0"], "--nodes 0"),
        (["c", "--gpus-per-node=2", "--procs-per-node=4"], "--procs-per-node 4 is more than"),
        (["c", "--time=1h"], "--time '1h'"),
        (["c", "--partition=a b"], "--partition 'a b'"),
        (["c", "--env=NOEQUALS"], "--env 'NOEQUALS'"),
        (["c", "--warn-s=0"], "--warn-s 0"),
    ],
)
def test_bad_options_are_one_line_usage_errors(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError, match=option):
        main(argv)
    assert run_main(main, argv, prog="tools.slurm") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tools.slurm: error:")
