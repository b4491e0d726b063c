"""Preemption: SIGTERM or SIGUSR1 saves a checkpoint and stops training cleanly.

Slurm warns a job before its time limit with the signal ``--signal=USR1@120`` asks
for, and a preempting scheduler sends SIGTERM (then SIGKILL after ``KillWait``).
:meth:`PreemptionFlag.install` makes either signal only *note* the request; the
training loop asks :meth:`PreemptionFlag.requested` at each log step
(``log.every_steps``), where every rank combines its flag with the others' in one
all-reduce (MAX), so all ranks agree on the same step without a host read on the
other steps. The loop then saves a checkpoint at that step and raises
:class:`Preempted`; ``train_dist.py`` exits with :data:`PREEMPTED_EXIT_CODE`, and a
rerun with ``checkpoint.resume=auto`` (the requeued job) resumes from that step.

Latency: at most ``log.every_steps`` steps plus one checkpoint save after the signal;
the warning time (``@120``) must cover both.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from common.dist import DistContext

#: ``train_dist.py``'s exit code after a preemption checkpoint (EX_TEMPFAIL: "try
#: again later"); ``tools/slurm/train.sbatch`` requeues the job on it.
PREEMPTED_EXIT_CODE = 75

#: The signals that request a checkpoint and a clean stop.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped at a step boundary for a preemption signal after saving a
    checkpoint (not an error: the command exits with :data:`PREEMPTED_EXIT_CODE`)."""

    def __init__(self, step: int, signal_name: str, checkpoint: str | None) -> None:
        self.step = step
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "the last good checkpoint"
        super().__init__(
            f"preempted ({signal_name}) at step {step}: resume from {where} "
            "(checkpoint.resume=auto)"
        )


class PreemptionFlag:
    """Notes a preemption signal; :meth:`requested` tells every rank at once."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Catch :data:`PREEMPTION_SIGNALS` (the main thread only; ``False`` elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return True

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signal_number = signum

    @property
    def signal_name(self) -> str:
        """The noted signal's name (the first rank's own, else ``"a peer's signal"``)."""
        if self.signal_number is None:
            return "a peer rank's signal"
        return signal.Signals(self.signal_number).name

    def requested(self, ctx: DistContext) -> bool:
        """Whether any rank noted a signal: one all-reduce and one read, so call it
        only where the loop reads back anyway (the log steps)."""
        local = self.signal_number is not None
        if not ctx.distributed:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32, device=ctx.device)
        ctx.all_reduce_(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
