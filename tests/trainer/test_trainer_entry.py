"""``train_dist.py`` end to end on a tiny synthetic dataset (one process), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_dist
from common.dist import DistContext
from configs import ConfigError, load_config
from trainer.build import build_backbone, build_evaluator, build_loader

IDS, PER_ID = 4, 6


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One intra-op thread, as under torchrun: the suite shares 2 cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_data(synthetic_data) -> Path:
    return synthetic_data(IDS, PER_ID, 4, 2, seed=1)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "configs/demo",
        f"data.root={data}",
        f"data.num_classes={IDS}",
        f"data.num_images={IDS * PER_ID}",
        "data.batch_size=6",
        "data.num_workers=0",
        f"train.output={out}",
        "train.epochs=2",
        "checkpoint.every_steps=3",
        "log.every_steps=2",
        "eval.batch_size=20",
        *extra,
    ]


def test_train_dist_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_dist.main(_args(tiny_data, out)) == 0
    assert json.loads((out / "config.json").read_text())["data"]["num_classes"] == IDS
    history = json.loads((out / "verification.json").read_text())
    assert [h["step"] for h in history] == [0, 8]  # at start and at the end
    # the recorded accuracy is that of the exported weights, recomputed independently
    cfg = load_config(str(out / "config.json"))
    backbone = build_backbone(cfg)
    backbone.load_state_dict(torch.load(out / "backbone.pt", weights_only=True))
    evaluator = build_evaluator(cfg)
    assert evaluator is not None
    final, again = history[-1]["results"]["heldout"], evaluator(backbone)["heldout"]
    assert again["accuracy"] == final["accuracy"]
    assert again["xnorm"] == pytest.approx(final["xnorm"], rel=1e-5)
    assert final["accuracy"] > history[0]["results"]["heldout"]["accuracy"]  # it trained
    assert any((out / "tensorboard").iterdir())
    log = (out / "train.log").read_text()
    for field in ("step 8/8", "epoch", "loss", "acc", "lr", "samples/s", "scale", "eta"):
        assert field in log
    weights = torch.load(out / "backbone.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000008"]  # keep_last=2
    # rerunning the same command resumes from the final checkpoint: nothing left to do
    assert train_dist.main(_args(tiny_data, out)) == 0
    assert "resumed from" in (out / "train.log").read_text()
    # a refused resume (another margin) exits 2 and leaves config.json describing what ran
    assert train_dist.main(_args(tiny_data, out, "head.margin=0.35")) == 2
    assert json.loads((out / "config.json").read_text())["head"]["margin"] != 0.35


def test_config_errors_stop_at_start_up(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train_dist.main(_args(tiny_data, tmp_path, "optimizer.lrr=0.1")) == 2
    assert "did you mean 'optimizer.lr'" in capsys.readouterr().err
    assert train_dist.main(_args(tiny_data, tmp_path, "data.num_images=7")) == 2
    assert "data.num_images=7" in capsys.readouterr().err


def test_data_checked_against_config(tiny_data: Path) -> None:
    cfg = load_config("demo", [f"data.root={tiny_data}", "data.num_classes=5"])
    with pytest.raises(ConfigError, match=r"data\.num_classes"):
        build_loader(cfg, DistContext())
    cfg = load_config("demo", [f"data.root={tiny_data}/missing"])
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_loader(cfg, DistContext())
