"""Run ``train_dist.py`` under real ``torchrun`` agents from tests.

:func:`tiny_dataset` writes a small synthetic face dataset; :func:`train_args` is a
demo-like configuration sized for seconds on CPU; :class:`Job` starts one torchrun
agent in its own process group (optionally inside a network namespace) and always
kills that group on exit; :func:`final_state` reads a finished run's backbone and
full head matrix back for comparison.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")

IDS, PER_ID = 8, 8  # 64 training images


def tiny_dataset(root: Path) -> Path:
    """A 64-image synthetic dataset (8 identities), no verification pairs needed."""
    from datasets.synthetic import SyntheticConfig, generate

    if not (root / "meta.json").exists():
        generate(root, SyntheticConfig(IDS, PER_ID, 2, 1, seed=3), workers=0)
    return root


def train_args(data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    """``train_dist.py`` arguments: the demo model on ``data``, per-rank ``batch``."""
    return [
        str(ROOT / "train_dist.py"),
        "configs/demo",
        f"data.root={data}",
        f"data.num_classes={IDS}",
        f"data.num_images={IDS * PER_ID}",
        f"data.batch_size={batch}",
        "data.num_workers=0",
        f"train.output={out}",
        "train.epochs=2",
        "eval.targets=",
        "eval.at_start=false",
        "log.tensorboard=false",
        "log.every_steps=1",
        "checkpoint.every_steps=0",
        *extra,
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (read from /proc)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class Job:
    """One torchrun agent (and its workers) as a subprocess in its own session.

    Use as a context manager: the whole process group is SIGKILLed on exit if it is
    still running, whatever happened in the test.
    """

    def __init__(
        self,
        torchrun_args: Sequence[str],
        script_args: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        cmd = [str(TORCHRUN), *torchrun_args, *script_args]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        full_env.pop("TORCHELASTIC_RESTART_COUNT", None)
        full_env.update(env or {})
        self.log = log
        self._fh = open(log, "wb")  # closed in __exit__
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> Job:
        return self

    def wait(self, timeout: float) -> int:
        """Exit code; raises ``TimeoutError`` (with the log's tail) past ``timeout`` s."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"torchrun did not finish in {timeout} s:\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL the agent and every descendant (torchrun starts each worker in a
        process group of its own, so the agent's group is not enough)."""
        if self.proc.poll() is None:
            for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=30)

    def tail(self, n: int = 60) -> str:
        self._fh.flush()
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def __exit__(self, *exc: Any) -> None:
        self.kill()
        self._fh.close()


def run(
    torchrun_args: Sequence[str],
    script_args: Sequence[str],
    log: Path,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> str:
    """Run one agent to completion; return its log; fail the test on a non-zero exit."""
    started = time.monotonic()
    with Job(torchrun_args, script_args, log, env) as job:
        code = job.wait(timeout)
        text = job.tail(10_000)
    if code != 0:
        raise AssertionError(f"torchrun exited with {code}:\n{text[-6000:]}")
    return text + f"\n[wall {time.monotonic() - started:.1f} s]"


def final_state(out: Path) -> dict[str, torch.Tensor]:
    """Backbone weights (``backbone.pt``) and the full head matrix of the newest
    checkpoint, assembled by global class whatever the world size."""
    from common.dist import DistContext
    from trainer.checkpoint import CheckpointStorage

    state = {
        f"backbone.{k}": v for k, v in torch.load(out / "backbone.pt", weights_only=True).items()
    }
    storage = CheckpointStorage(out / "checkpoints", DistContext())
    latest = storage.latest()
    assert latest is not None, f"no complete checkpoint under {out}"
    ckpt = storage.open(latest)
    head, optim = storage.load_head_shard(ckpt, 0, IDS, 1)
    state["head.weight"] = head["weight"]
    for k, v in optim["state"].get(0, {}).items():
        if isinstance(v, torch.Tensor):
            state[f"head.optim.{k}"] = v
    state["step"] = torch.tensor(ckpt.meta["step"])
    return state


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over the common keys (asserting equal key sets)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst = 0.0
    for k in a:
        x, y = a[k], b[k]
        assert x.shape == y.shape, k
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst
