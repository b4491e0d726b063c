"""Rank-0 observability: log lines, experiment tracking and a TTY-only progress bar.

The metrics go to a :class:`trainer.tracking.Tracking` fan-out (TensorBoard, MLflow,
W&B: whichever ``log.backends`` names); the monitor does not know which.

Output failures name the file and never crash the run from a side channel: creating
``train.log`` fails with :class:`~common.atomic.OutputWriteError` at start-up; a
later write to it (full disk) prints one line naming it, and the file log stops (the
stdout log goes on). TensorBoard likewise: its directory is probed at start-up
(:func:`trainer.preflight.probe_tensorboard`), and a later failure of the event writer
(in its own thread) logs one warning naming the directory and turns TensorBoard off,
instead of a thread traceback and an exception at the next scalar.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common.atomic import OutputWriteError
from trainer.tracking import TensorBoardTracker, Tracking

log = logging.getLogger("trainer")


class _LogFile(logging.FileHandler):
    """``train.log``: a write that fails prints one line naming the file and stops the
    file log (instead of logging's ``--- Logging error ---`` traceback on every line)."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        reason = exc.strerror or str(exc)
        print(
            f"warning: cannot write {self.baseFilename}: {reason}; the file log stops "
            "here, stdout goes on",
            file=sys.stderr,
        )
        logging.getLogger().removeHandler(self)
        with contextlib.suppress(Exception):
            self.close()


def setup_logging(output: str | Path | None, rank: int) -> None:
    """Rank 0 logs INFO to stdout and ``<output>/train.log``; other ranks only warnings."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in list(root.handlers):
        root.removeHandler(h)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if rank == 0 and output is not None:
        path = Path(output) / "train.log"
        try:
            Path(output).mkdir(parents=True, exist_ok=True)
            file = _LogFile(path)
        except OSError as exc:
            raise OutputWriteError.wrap(path, exc) from exc
        file.setFormatter(fmt)
        root.addHandler(file)


class Monitor:
    """Collects per-step metrics on rank 0; silent on other ranks.

    Args:
        enabled: True on rank 0.
        total_steps: optimizer steps in the run (for the ETA and the bar).
        start_step: first step of this process (after a resume).
        tensorboard_dir: where to write TensorBoard scalars, or ``None`` (added to
            ``tracking`` as its ``tensorboard`` backend).
        progress_bar: allow a tqdm bar (shown only if stderr is a terminal).
        tracking: the run's other tracking backends (started by the caller, closed by
            :meth:`close`).
    """

    def __init__(
        self,
        enabled: bool,
        total_steps: int,
        start_step: int,
        tensorboard_dir: Path | None,
        progress_bar: bool,
        tracking: Tracking | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.tracking = tracking or Tracking({})
        self.bar: Any = None
        self._t0 = time.perf_counter()
        self._last_time = self._t0
        self._last_step = start_step
        self._samples = 0
        self._wait = 0.0
        if not enabled:
            return
        if tensorboard_dir is not None:
            self.tracking.trackers["tensorboard"] = TensorBoardTracker(tensorboard_dir)
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @property
    def writer(self) -> Any:
        """TensorBoard's ``SummaryWriter`` while it works, else ``None``."""
        tb = self.tracking.get("tensorboard")
        return getattr(tb, "writer", None)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of non-training work (verification, saving) out of the
        throughput and ETA."""
        self._last_time += seconds

    def waited(self, seconds: float) -> None:
        """Record ``seconds`` spent waiting for the loader's next batch."""
        self._wait += seconds

    def count(self, samples: int) -> None:
        """Record ``samples`` global samples trained since the last log line."""
        self._samples += samples
        if self.bar is not None:
            self.bar.update(1)

    def log_step(
        self,
        step: int,
        epoch: int,
        loss: float | None,
        acc: float | None,
        lr: float,
        scale: float | None,
        terms: dict[str, float] | None = None,
        skipped: int = 0,
    ) -> None:
        """Emit one log line and the matching metrics to every tracking backend.

        ``loss``, ``acc`` and ``terms`` (the unweighted auxiliary losses ``center``,
        ``triplet``) are means over the steps since the last line that were not
        skipped; ``skipped`` counts the others. ``loss=None`` means every step since
        the last line was skipped: the line says so instead of showing a mean of
        nothing."""
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        speed = self._samples / elapsed
        steps_done = max(step - self._last_step, 1)
        eta_s = (self.total_steps - step) * elapsed / steps_done
        eta = str(datetime.timedelta(seconds=round(eta_s)))
        scale_txt = f"{scale:.0f}" if scale is not None else "-"
        if loss is None or acc is None:
            what = f"all {skipped} steps since the last log skipped (non-finite loss/gradient)"
        else:
            what = f"loss {loss:.4f} acc {acc:.4f}" + (f" ({skipped} skipped)" if skipped else "")
        log.info(
            "step %d/%d epoch %d %s lr %.6f samples/s %.1f scale %s eta %s",
            step,
            self.total_steps,
            epoch,
            what,
            lr,
            speed,
            scale_txt,
            eta,
        )
        terms = terms or {}
        if terms:
            log.info("step %d aux %s", step, " ".join(f"{k} {v:.4f}" for k, v in terms.items()))
        if self.bar is not None and loss is not None and acc is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", lr=f"{lr:.4g}")
        scalars = {"train/skipped_steps": float(skipped), "train/lr": lr}
        if loss is not None and acc is not None:
            scalars.update({"train/loss": loss, "train/accuracy": acc})
        scalars.update({"train/samples_per_s": speed, "train/epoch": float(epoch)})
        scalars["train/loader_wait_s"] = self._wait
        scalars["train/memory_mb"] = memory_mb()
        if scale is not None:
            scalars["train/grad_scale"] = scale
        scalars.update({f"train/{name}_loss": value for name, value in terms.items()})
        self.tracking.log_metrics(scalars, step)
        self._last_time, self._last_step, self._samples, self._wait = now, step, 0, 0.0

    def log_verification(self, step: int, results: dict[str, dict[str, float]]) -> None:
        """Log and record verification results (one line per target)."""
        if not self.enabled:
            return
        scalars: dict[str, float] = {}
        for name, r in results.items():
            log.info(
                "verify step %d [%s] accuracy %.5f +- %.5f xnorm %.3f",
                step,
                name,
                r["accuracy"],
                r.get("accuracy_std", 0.0),
                r.get("xnorm", 0.0),
            )
            scalars[f"verify/{name}/accuracy"] = r["accuracy"]
            for key in ("accuracy_std", "val", "xnorm"):
                if key in r:
                    scalars[f"verify/{name}/{key}"] = r[key]
        self.tracking.log_metrics(scalars, step)

    def close(self) -> None:
        """Close the tracking backends and the bar."""
        if self.bar is not None:
            self.bar.close()
        self.tracking.close()


def memory_mb() -> float:
    """Peak memory in MiB: the CUDA allocator's on a GPU run, else the process's RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
