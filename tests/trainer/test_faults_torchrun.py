"""Faults under real ``torchrun --max-restarts=1`` jobs (2 CPU ranks): a rank SIGKILLed
mid-training, and a rank SIGKILLed while writing a checkpoint. Both jobs restart,
resume from the last complete checkpoint and end bit-identical to an uninterrupted
run (CPU training is deterministic and resume restores every state)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.torchrun_jobs import ROOT, final_state, max_abs_diff, run, tiny_dataset, train_args

BATCH = 4  # per rank: 2 ranks -> 8 steps per epoch, 2 epochs -> 16 steps
EXTRA = ("checkpoint.every_steps=4", "checkpoint.keep_last=3")
LAUNCH = ["--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.5"]
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("faults-data"))


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(LAUNCH, train_args(data, out, BATCH, *EXTRA), out.parent / "log")
    return final_state(out)


def _faulty_run(data: Path, tmp_path: Path, fault: str) -> tuple[dict, str, str]:
    out = tmp_path / "run"
    args = train_args(data, out, BATCH, *EXTRA)
    args[0] = str(ROOT / "tests" / "fault_entry.py")
    agent_log = run(LAUNCH, args, tmp_path / "torchrun.log", env={**ENV, "PFC_FAULT": fault})
    return final_state(out), (out / "train.log").read_text(), agent_log


def _assert_identical(resumed: dict, reference: dict) -> None:
    assert int(resumed["step"]) == int(reference["step"]) == 16
    diff = max_abs_diff(resumed, reference)
    assert diff == 0.0, f"max abs difference {diff:.3g}"
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_rank_killed_mid_training_restarts_and_resumes(
    data: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    """Rank 1 is SIGKILLed before step 7; torchrun restarts both ranks, which resume
    from step 4 and finish identical to the uninterrupted run."""
    state, log, agent_log = _faulty_run(data, tmp_path, "step:7:1")
    assert re.search(r"exitcode\s*:\s*-9|Signal 9|SIGKILL", agent_log), agent_log[-3000:]
    assert re.search(r"resumed from \S+step-00000004 \(step 4", log), log[-3000:]
    assert "step 6/16" in log  # the first attempt got that far
    _assert_identical(state, uninterrupted)


def test_rank_killed_while_saving_resumes_from_previous_checkpoint(
    data: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    """Rank 1 dies half-way through writing step 8's head shard: the partial
    ``.tmp-step-00000008`` is never picked, the job resumes from step 4."""
    state, log, _ = _faulty_run(data, tmp_path, "save:8:1")
    assert re.search(r"resumed from \S+step-00000004 \(step 4", log), log[-3000:]
    assert "step-00000008" not in log.split("resumed from")[1].splitlines()[0]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000008", "step-00000012", "step-00000016"]  # no .tmp left
    _assert_identical(state, uninterrupted)
