"""Experiment tracking: one small interface, any subset of TensorBoard, MLflow and W&B.

The trainer talks to a :class:`Tracking` fan-out (through :class:`trainer.monitor.Monitor`)
and never learns which backends ``log.backends`` names. Each backend is a
:class:`Tracker` made by the factory registered under its name (:data:`TRACKERS`,
:func:`register_tracker`) from the run's :class:`TrackerSettings`.

* Only rank 0 tracks (the trainer starts the fan-out there only).
* Start-up: a backend that cannot start (its package missing, a tracking server that
  does not answer) is a :class:`TrackingError` naming the backend and the option.
* Mid-run: a backend call that fails logs one warning naming the backend, and that backend
  stops; training and the other backends go on.
* Resume: each backend's run id (``Tracker.run_id``) is kept in the checkpoint
  (``trainer.checkpoint.JsonDict``) and handed back in :attr:`TrackerSettings.run_ids`,
  so a resumed job continues the same MLflow / W&B run.

mlflow and wandb are optional (``requirements-tracking.txt``), imported only when their
backend starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common.atomic import OutputWriteError
from common.errors import UserError

log = logging.getLogger("trainer")

#: The most parameters MLflow takes in one call, and its longest parameter value.
_MLFLOW_BATCH = 100
_MLFLOW_MAX_VALUE = 6000


class TrackingError(UserError, RuntimeError):
    """A tracking backend cannot start; the message names it and the option to change."""


class Tracker(Protocol):
    """What the trainer logs to: one backend (TensorBoard, an MLflow run, a W&B run)."""

    #: The backend's run id, recorded in checkpoints (``None``: nothing to resume).
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def close(self) -> None: ...


@dataclass
class TrackerSettings:
    """What a backend needs to start: the run's output directory, the MLflow tracking URI
    (empty: ``file:<output>/mlruns``), the experiment (MLflow) / project (W&B) and run
    name, and the run ids of the run being resumed (by backend name)."""

    output: Path
    experiment: str
    run_name: str
    mlflow_uri: str = ""
    run_ids: dict[str, str] = field(default_factory=dict)


TrackerFactory = Callable[[TrackerSettings], Tracker]

#: Backend name -> factory; the names are ``configs.schema.LOG_BACKENDS``.
TRACKERS: dict[str, TrackerFactory] = {}


def register_tracker(name: str, factory: TrackerFactory) -> None:
    """Make ``name`` a backend that ``log.backends`` may list."""
    TRACKERS[name] = factory


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"head": {"margin": 0.5}}`` -> ``{"head.margin": 0.5}`` (lists as JSON text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple | Mapping):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------ TensorBoard
class TensorBoardTracker:
    """Scalars under ``<output>/tensorboard``. A failure of its event writer (in its own
    thread; a full disk) is reported by the fan-out as one warning naming the directory,
    without a thread traceback."""

    run_id = None

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        try:
            self.writer = SummaryWriter(str(directory))
        except OSError as exc:
            raise OutputWriteError.wrap(directory, exc) from exc
        if threading.excepthook is not _quiet_event_writer:
            _quiet_event_writer.previous = threading.excepthook  # type: ignore[attr-defined]
            threading.excepthook = _quiet_event_writer

    @classmethod
    def from_settings(cls, settings: TrackerSettings) -> TensorBoardTracker:
        return cls(settings.output / "tensorboard")

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {k} = {v}" for k, v in sorted(params.items()))
        self.writer.add_text("config", text, 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        del path  # TensorBoard keeps scalars only

    def close(self) -> None:
        self.writer.close()

    def failure(self, exc: BaseException) -> str:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return (
            f"cannot write TensorBoard events to {self.directory}: {reason}; TensorBoard "
            "logging stops here, training goes on"
        )


def _quiet_event_writer(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook`` that drops TensorBoard's event-writer thread errors
    (re-raised by the writer's next call, reported then) and passes the others on."""
    if type(args.thread).__name__ == "_AsyncWriterThread":
        return
    _quiet_event_writer.previous(args)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------- MLflow
def _check_http(uri: str, timeout_s: float = 10.0) -> None:
    """Raise ``OSError`` unless the MLflow server at ``uri`` answers ``/health`` within
    ``timeout_s`` (MLflow's own client retries for minutes)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            r.read()
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code} from {uri}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise OSError(f"{getattr(exc, 'reason', exc)}") from None


class MlflowTracker:
    """An MLflow run in ``experiment``, through ``MlflowClient`` (no global state): a new
    run, or the one whose id the checkpoint recorded."""

    def __init__(self, settings: TrackerSettings) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._Metric, self._Param = Metric, Param
        uri = settings.mlflow_uri or (settings.output / "mlruns").resolve().as_uri()
        if uri.startswith(("http://", "https://")):
            _check_http(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        resumed = settings.run_ids.get("mlflow")
        if resumed:
            self.run_id: str | None = resumed
            self.client.get_run(resumed)  # fails here if the server lost it
            self.client.update_run(resumed, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(settings.experiment)
            )
            run = self.client.create_run(experiment_id, run_name=settings.run_name)
            self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [self._Param(k, str(v)[:_MLFLOW_MAX_VALUE]) for k, v in sorted(params.items())]
        if self.run_id is None:
            return
        known = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in known]  # a resumed run keeps its params
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MLFLOW_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [self._Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(str(self.run_id), metrics=batch)

    def log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(str(self.run_id), str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(str(self.run_id), str(path))

    def close(self) -> None:
        self.client.set_terminated(str(self.run_id))


# -------------------------------------------------------------------------- W&B
class WandbTracker:
    """A W&B run, offline unless ``WANDB_MODE`` says otherwise, its files under
    ``<output>/wandb``; a resumed job continues the run of the recorded id."""

    def __init__(self, settings: TrackerSettings) -> None:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run_id: str | None = settings.run_ids.get("wandb") or secrets.token_hex(4)
        self.run = wandb.init(
            project=settings.experiment,
            name=settings.run_name,
            id=self.run_id,
            resume="allow",
            dir=str(settings.output),
            reinit="create_new",
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path) -> None:
        kind = "model" if path.is_dir() or path.suffix in (".onnx", ".pt") else "file"
        artifact = self.wandb.Artifact(path.name.replace("/", "-"), type=kind)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


register_tracker("tensorboard", TensorBoardTracker.from_settings)
register_tracker("mlflow", MlflowTracker)
register_tracker("wandb", WandbTracker)

#: Per backend, the option a start-up failure points at.
_OPTIONS = {"mlflow": "log.mlflow_uri", "wandb": "WANDB_MODE / wandb login"}


# ----------------------------------------------------------------------- fan-out
class Tracking:
    """Every started backend behind one :class:`Tracker`-like interface. A backend whose
    call fails is warned about once (naming it) and dropped; the others go on."""

    def __init__(self, trackers: Mapping[str, Tracker]) -> None:
        self.trackers = dict(trackers)

    @property
    def run_ids(self) -> dict[str, str]:
        """The backends' run ids, by name (those that have one)."""
        return {n: t.run_id for n, t in self.trackers.items() if t.run_id}

    def get(self, name: str) -> Tracker | None:
        return self.trackers.get(name)

    def _each(self, call: Callable[[Tracker], Any]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as exc:  # a side channel never stops training
                del self.trackers[name]
                describe = getattr(tracker, "failure", None)
                if callable(describe):
                    log.warning("%s", describe(exc))
                else:
                    reason = " ".join(str(exc).split()) or type(exc).__name__
                    log.warning(
                        "log.backends=%s failed (%s: %s); %s logging stops here, training goes on",
                        name,
                        type(exc).__name__,
                        reason[:300],
                        name,
                    )
                with contextlib.suppress(Exception):
                    tracker.close()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each(lambda t: t.log_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._each(lambda t: t.log_metrics(metrics, step))

    def log_artifact(self, path: Path) -> None:
        self._each(lambda t: t.log_artifact(path))

    def close(self) -> None:
        self._each(lambda t: t.close())
        self.trackers.clear()


def start_tracking(names: Sequence[str], settings: TrackerSettings) -> Tracking:
    """Start the backends ``names`` (in order); the first that cannot start raises a
    :class:`TrackingError` naming it and its option, after closing those started."""
    started: dict[str, Tracker] = {}
    for name in names:
        factory = TRACKERS.get(name)
        if factory is None:
            raise TrackingError(
                f"log.backends: unknown backend {name!r}; valid: {', '.join(TRACKERS)}"
            )
        try:
            started[name] = factory(settings)
        except ImportError as exc:
            Tracking(started).close()
            package = (exc.name or name).split(".")[0]
            raise TrackingError(
                f"log.backends lists {name}, but {package} is not installed "
                "(pip install -r requirements-tracking.txt, or drop it from log.backends)"
            ) from None
        except OutputWriteError:
            Tracking(started).close()
            raise
        except Exception as exc:  # the backend's own start-up failure
            Tracking(started).close()
            option = _OPTIONS.get(name, "log.backends")
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            where = (
                f" ({option}={settings.mlflow_uri or 'file:<train.output>/mlruns'})"
                if (name == "mlflow")
                else f" (check {option})"
            )
            raise TrackingError(
                f"log.backends={name}: cannot start{where}: {type(exc).__name__}: {reason}"
            ) from None
    return Tracking(started)
