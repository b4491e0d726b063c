"""The margin registry: a new margin is one class plus one registration, and then it is
configurable (``head.loss``, its options checked at start-up naming them), buildable
through ``trainer.build`` and trainable, with no other edit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch

from configs import ConfigError, HeadConfig, load_config
from partial_fc import CombinedMargin, margin_entry, margin_names, register_margin
from partial_fc.backend import triton_unsupported
from partial_fc.batch_margins import BatchMargin, TargetTerms
from partial_fc.registry import entry_of, unregister_margin
from trainer.build import build_head, build_margin


class HalfArc(CombinedMargin):
    """A toy margin: ArcFace's ``margin`` (one, or one per class) and a cosine margin of
    half the mean of it."""

    def __init__(self, scale: float = 64.0, margin=0.5, *, straight_through=False) -> None:
        super().__init__(scale, 1.0, margin, 0.0, straight_through=straight_through)
        self.set_margins(float(self.m2.mean()) / 2, "m3")


class SlopedCos(BatchMargin):
    """A toy batch-aware margin: CosFace whose margin grows with ``gain`` times the norm;
    the triton kernels are declared unable to run it."""

    def __init__(self, scale: float = 64.0, margin: float = 0.2, gain: float = 0.0) -> None:
        if not gain >= 0:
            raise ValueError(f"gain must be >= 0, got {gain}")
        super().__init__(scale, 1.0, 0.0, margin)
        self.gain = float(gain)

    def batch_target(self, cos, classes, batch):
        m = self._scalar("m3", cos.dtype) + self.gain * batch.norms.detach().to(cos.dtype)
        return TargetTerms(self.scale * (cos - m), torch.full_like(cos, self.scale))


@pytest.fixture
def toys() -> Iterator[None]:
    register_margin("halfarc", HalfArc, ("scale", "margin", "straight_through"), per_class="margin")
    register_margin(
        "slopedcos",
        SlopedCos,
        {"scale": "scale", "margin": "margin", "gain": "adaface_h"},
        no_triton_why="a toy",
    )
    try:
        yield
    finally:
        unregister_margin("halfarc")
        unregister_margin("slopedcos")


def test_a_registered_margin_is_configured_built_and_trained(toys: None, tmp_path: Path) -> None:
    assert {"halfarc", "slopedcos"} <= set(margin_names())
    cfg = load_config(
        "demo", ["head.loss=halfarc", "head.margin=0.4", "data.num_classes=6", "data.batch_size=4"]
    )
    margin = build_margin(cfg.head)  # trainer.build's path
    assert type(margin) is HalfArc
    assert (float(margin.m2), float(margin.m3)) == pytest.approx((0.4, 0.2))
    head = build_head(cfg, torch.device("cpu"))
    assert type(head.margin) is HalfArc
    x = torch.randn(4, cfg.model.embedding_size, requires_grad=True)
    loss = head(x, torch.tensor([0, 1, 2, 5]))
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and head.weight.grad is not None
    # a JSON file names it as well as an override does
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"base": "demo", "head": {"loss": "halfarc", "margin": 0.3}}))
    assert load_config(str(path)).head.loss == "halfarc"


def test_a_registered_margins_checks_name_its_options(toys: None, tmp_path: Path) -> None:
    # the margin classes' own checks, naming the arguments they read
    with pytest.raises(ConfigError, match=r"^head\.margin: must be finite and in \[0, pi\)"):
        load_config("demo", ["head.loss=halfarc", "head.margin=7"])
    with pytest.raises(ConfigError, match=r"^head\.adaface_h must be >= 0, got -1"):
        load_config("demo", ["head.loss=slopedcos", "head.adaface_h=-1"])
    with pytest.raises(ConfigError, match=r"^head\.margins_file: per-class margins do not apply"):
        load_config("demo", ["head.loss=slopedcos", "head.margins_file=m.txt"])
    margins = tmp_path / "m.txt"
    margins.write_text("0.2\n9\n")
    with pytest.raises(ConfigError, match=r"^head\.margins_file \(from .*m\.txt\): .*class 1"):
        load_config("demo", ["head.loss=halfarc", f"head.margins_file={margins}"])


def test_the_registry_tells_the_backend_which_margins_triton_runs(toys: None) -> None:
    assert triton_unsupported(loss="halfarc") is None
    assert triton_unsupported(margin=HalfArc()) is None
    assert triton_unsupported(loss="slopedcos") == "SlopedCos (a toy)"
    assert triton_unsupported(margin=SlopedCos()) == "SlopedCos (a toy)"
    assert "CurricularFace (its hard negatives" in (triton_unsupported(loss="curricular") or "")
    with mock.patch("partial_fc.backend.triton_missing", return_value=None):
        with pytest.raises(ConfigError, match=r"^head\.backend=triton: SlopedCos \(a toy\)"):
            HeadConfig(loss="slopedcos", backend="triton").validate()
        HeadConfig(loss="halfarc", backend="triton").validate()


def test_unregistered_names_are_refused_and_registration_is_checked(toys: None) -> None:
    with pytest.raises(ConfigError, match=r"^head\.loss: must be one of arcface, .*halfarc"):
        load_config("demo", ["head.loss=quarterarc"])
    with pytest.raises(ValueError, match="registered already"):
        register_margin("halfarc", HalfArc, ("scale",))
    with pytest.raises(TypeError, match="derives from CombinedMargin"):
        register_margin("linear", torch.nn.Linear, ("in_features",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_class='m2' is not one of the options"):
        register_margin("other", HalfArc, ("scale", "margin"), per_class="m2")
    assert "other" not in margin_names()


def test_every_shipped_entry_reads_head_options_and_builds_at_the_defaults() -> None:
    fields = {f.name for f in dataclasses.fields(HeadConfig)}
    for name in margin_names():
        entry = margin_entry(name)
        assert set(entry.options.values()) <= fields, name
        assert entry.batch_aware == issubclass(entry.cls, BatchMargin)
        assert (entry.per_class is None) == entry.batch_aware, name
        built = build_margin(HeadConfig(loss=name, margin=4.0 if name == "sphereface" else 0.5))
        assert type(built) is entry.cls and entry_of(built) is entry
