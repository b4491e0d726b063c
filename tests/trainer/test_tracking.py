"""Experiment tracking (issue 29, item 1): the fan-out with two backends, start-up and
mid-run failures, MLflow against a real ``mlflow server`` (SQLite store) and W&B offline,
each resumed into the same run."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from configs import ConfigError, load_config
from configs.schema import LOG_BACKENDS
from tests.trainer.test_trainer import TensorLoader, dataset, make_cfg, make_trainer
from trainer.monitor import Monitor
from trainer.tracking import TRACKERS, TrackerSettings, TrackingError, start_tracking

pytestmark = pytest.mark.usefixtures("one_thread")


class Recording:
    """A backend that records what it was given (and may fail on metrics)."""

    def __init__(self, settings: TrackerSettings, fail: bool = False) -> None:
        self.run_id = "rec-1"
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[Path] = []
        self.closed = False
        self.fail = fail

    def log_params(self, params: Any) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Any, step: int) -> None:
        if self.fail:
            raise ConnectionError("server went away")
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path) -> None:
        self.artifacts.append(path)

    def close(self) -> None:
        self.closed = True


def test_registry_covers_the_configurable_backends() -> None:
    assert set(LOG_BACKENDS) <= set(TRACKERS)
    with pytest.raises(ConfigError, match=r"log\.backends: must be a list of distinct names"):
        load_config("demo", ["log.backends=[tensorboard,nope]"])
    cfg = load_config("demo", ["log.backends=[tensorboard,mlflow]", "log.tensorboard=false"])
    assert cfg.log.active_backends() == ["mlflow"]  # the old switch still turns TB off


def test_two_backends_at_once_and_a_mid_run_failure(tmp_path, monkeypatch, caplog) -> None:
    made: dict[str, Recording] = {}

    def factory(fail: bool):
        def make(settings: TrackerSettings) -> Recording:
            made["bad" if fail else "rec"] = Recording(settings, fail)
            return made["bad" if fail else "rec"]

        return make

    monkeypatch.setitem(TRACKERS, "rec", factory(False))
    monkeypatch.setitem(TRACKERS, "bad", factory(True))
    settings = TrackerSettings(tmp_path, "exp", "run")
    fan = start_tracking(["tensorboard", "rec", "bad"], settings)
    monitor = Monitor(True, 10, 0, None, False, fan)
    fan.log_params({"head.margin": 0.5})
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for step in (1, 2):
            monitor.waited(0.25)
            monitor.log_step(step, 0, 1.5, 0.25, 0.1, None, {"center": 0.5})
        monitor.log_verification(2, {"lfw": {"accuracy": 0.9, "accuracy_std": 0.01}})
        fan.log_artifact(tmp_path / "backbone.pt")
        monitor.close()
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "log.backends=bad failed (ConnectionError: server went away); bad logging stops "
        "here, training goes on"
    ]
    rec = made["rec"]
    assert rec.params == {"head.margin": 0.5} and rec.closed
    assert [s for s, _ in rec.metrics] == [1, 2, 2]
    first = rec.metrics[0][1]
    assert first["train/loss"] == 1.5 and first["train/accuracy"] == 0.25
    assert first["train/lr"] == 0.1 and first["train/loader_wait_s"] == 0.25
    assert first["train/memory_mb"] > 0 and "train/samples_per_s" in first
    assert first["train/center_loss"] == 0.5
    assert rec.metrics[2][1] == {"verify/lfw/accuracy": 0.9, "verify/lfw/accuracy_std": 0.01}
    assert rec.artifacts == [tmp_path / "backbone.pt"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_package_is_a_start_up_error_naming_the_backend(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    with pytest.raises(TrackingError, match=r"log\.backends lists mlflow, but mlflow is not"):
        start_tracking(["mlflow"], TrackerSettings(tmp_path, "e", "r"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_server_is_a_start_up_error(tmp_path) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed (requirements-tracking.txt)")
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(
        TrackingError, match=rf"log\.backends=mlflow: cannot start \(log\.mlflow_uri={uri}\)"
    ):
        start_tracking(["mlflow"], TrackerSettings(tmp_path, "e", "r", mlflow_uri=uri))


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store; stopped at the end."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (requirements-tracking.txt)")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--default-artifact-root", (tmp_path / "artifacts").as_uri(), "--no-serve-artifacts",
        "--workers", "1",
    ]  # fmt: skip
    log_file = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_file.flush()
                    tail = (tmp_path / "server.log").read_text()[-2000:]
                    pytest.fail(f"mlflow server did not start: {tail}")
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def _train(out: Path, *overrides: str, resume: bool = False):
    x, y = dataset()
    t = make_trainer(make_cfg(out, "log.every_steps=2", *overrides), TensorLoader(x, y, 8, 0, 1))
    if resume:
        assert t.maybe_resume() is not None
    t.fit()
    return t


def test_mlflow_server_run_resumes_into_the_same_run(tmp_path, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    opts = ("log.backends=[mlflow]", f"log.mlflow_uri={mlflow_server}", "log.experiment=t29")
    first = _train(out, *opts, "train.max_steps=6")
    run_id = first.tracking_runs["mlflow"]
    second = _train(out, *opts, resume=True)
    assert second.tracking_runs["mlflow"] == run_id and second.step == 24
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["head.loss"] == "arcface" and run.data.params["data.batch_size"] == "8"
    assert (
        len(run.data.params["git.commit"]) in (7, 40) or run.data.params["git.commit"] == "unknown"
    )
    assert run.data.params["git.dirty"] in ("True", "False")
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]  # both jobs, one run
    assert {m.key for m in client.get_metric_history(run_id, "train/lr")} == {"train/lr"}
    for key in ("train/loader_wait_s", "train/memory_mb", "train/samples_per_s"):
        assert client.get_metric_history(run_id, key)
    assert [a.path for a in client.list_artifacts(run_id)] == ["backbone.pt"]
    assert run.info.status == "FINISHED"
    runs = client.search_runs([client.get_experiment_by_name("t29").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]


def wandb_records(path: Path) -> list[bytes]:
    """The serialized records of an offline run's ``.wandb`` file: a ``:W&B`` header, then
    leveldb-log framing (32 KiB blocks; 7-byte record headers: CRC, length, type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, header = 32768, 7
    i, part, out = 7, b"", []
    while i + header <= len(data):
        left = block - i % block
        if left < header:  # the block's zero padding
            i += left
            continue
        _, length, kind = struct.unpack("<IHB", data[i : i + header])
        chunk, i = data[i + header : i + header + length], i + header + length
        part += chunk
        if kind in (1, 4):  # FULL, LAST
            out.append(part)
            part = b""
    return out


def read_offline_run(path: Path) -> tuple[str, set[str], list[tuple[int, float]]]:
    """``(run id, config keys, [(step, train/loss)])`` of one offline run's file."""
    from wandb.proto import wandb_internal_pb2

    run_id, keys, losses = "", set(), []
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "config":
            keys |= {item.key for item in record.config.update}
        elif kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }  # W&B stores "train/loss" as the nested key ["train", "loss"]
            if "train/loss" in row:
                losses.append((int(row["_step"]), float(row["train/loss"])))
    return run_id, keys, losses


def test_wandb_offline_run_resumes_into_the_same_run(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (requirements-tracking.txt)")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    first = _train(out, "log.backends=[wandb]", "train.max_steps=6")
    assert os.environ["WANDB_MODE"] == "offline"
    run_id = first.tracking_runs["wandb"]
    second = _train(out, "log.backends=[wandb]", resume=True)
    assert second.tracking_runs["wandb"] == run_id
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one directory per job, the same run id
    runs = [read_offline_run(f) for f in files]
    assert {r[0] for r in runs} == {run_id}
    assert {"head.loss", "data.batch_size", "git.commit", "git.dirty"} <= runs[0][1]
    steps = [s for r in runs for s, _ in r[2]]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]
