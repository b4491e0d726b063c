"""``train_dist.py`` with one injected SIGKILL, for the torchrun fault tests.

``PFC_FAULT=step:N:R`` kills rank R just before optimizer step N; ``PFC_FAULT=save:N:R``
kills rank R half-way through writing its head shard of step N's checkpoint;
``PFC_FAULT=signal:N:R`` sends rank R a SIGUSR1 (Slurm's preemption warning) just before
step N instead of killing it. Only the first attempt (``TORCHELASTIC_RESTART_COUNT=0``)
is hit; the restarted one runs clean. Test-only: the trainer itself has no fault hooks.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str, rank: int) -> None:
    """Patch the trainer so that ``spec`` (``step:N:R`` or ``save:N:R``) happens."""
    from trainer.checkpoint import CheckpointStorage
    from trainer.loop import Trainer

    kind, step_text, rank_text = spec.split(":")
    step, victim = int(step_text), int(rank_text)
    if rank != victim:
        return
    if kind == "signal":
        real_step = Trainer.train_step

        def train_step_signalled(self: Trainer, micro: Any) -> Any:
            if self.step + 1 == step:
                os.kill(os.getpid(), signal.SIGUSR1)
            return real_step(self, micro)

        Trainer.train_step = train_step_signalled  # type: ignore[method-assign]
    elif kind == "step":
        real_step = Trainer.train_step

        def train_step(self: Trainer, micro: Any) -> Any:
            if self.step + 1 == step:
                _die()
            return real_step(self, micro)

        Trainer.train_step = train_step  # type: ignore[method-assign]
    elif kind == "save":
        real_write = CheckpointStorage.write_file

        def write_file(self: CheckpointStorage, obj: Any, path: Path) -> str:
            if path.parent.name == f".tmp-step-{step:08d}" and path.name.startswith("head-"):
                path.write_bytes(b"\x80\x02half a head shard")
                _die()
            return real_write(self, obj, path)

        CheckpointStorage.write_file = write_file  # type: ignore[method-assign]
    else:
        raise ValueError(f"PFC_FAULT: unknown kind {kind!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import train_dist

    spec = os.environ.get("PFC_FAULT", "")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        # torchrun's RANK, or SLURM_PROCID when launched like srun
        install(spec, int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    sys.exit(train_dist.main(sys.argv[1:]))
