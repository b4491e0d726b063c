"""The batch-aware margins from the configuration: presets, options, refusals."""

from __future__ import annotations

import pytest

from configs import ConfigError, load_config
from partial_fc import AdaFace, CurricularFace, ElasticFace, MagFace
from trainer.build import build_margin


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        (["head.loss=adaface", "head.margin=0.4", "head.adaface_h=0.5"], AdaFace),
        (["head.loss=magface", "head.magface_lambda_g=20"], MagFace),
        (["head.loss=curricular", "head.ema_alpha=0.05"], CurricularFace),
        (["head.loss=elastic", "head.elastic_kind=cos", "head.margin=0.35"], ElasticFace),
    ],
)
def test_head_options_build_the_margin(overrides: list[str], kind: type) -> None:
    margin = build_margin(load_config("demo", overrides).head)
    assert type(margin) is kind
    if kind is AdaFace:
        assert margin.h == 0.5 and float(margin.m2) == pytest.approx(0.4)
    if kind is MagFace:
        assert margin.lambda_g == 20.0
    if kind is CurricularFace:
        assert margin.t_alpha == 0.05
    if kind is ElasticFace:
        assert margin.kind == "cos" and float(margin.m3) == pytest.approx(0.35)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["head.loss=adaface", "head.adaface_h=-1"], r"head\.adaface_h must be a finite"),
        (["head.loss=magface", "head.magface_u_a=5"], r"head\.magface_l_a < head\.magface_u_a"),
        (["head.loss=curricular", "head.ema_alpha=0"], r"head\.ema_alpha is an EMA weight"),
        (["head.loss=elastic", "head.margins_file=m.txt"], r"head\.margins_file: per-class"),
        (["head.loss=adaface", "head.margin=3.5"], r"margin"),
        (["augment.lowres_prob=1.5"], r"augment\.lowres_prob: must be in \[0, 1\]"),
    ],
)
def test_bad_batch_margin_options_are_refused_by_name(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_presets_of_the_batch_margins() -> None:
    ada = load_config("webface4m_r50_adaface")
    assert (ada.head.loss, ada.model.network, ada.data.num_classes) == ("adaface", "r50", 205_990)
    assert (ada.augment.crop_prob, ada.augment.lowres_prob, ada.augment.photometric_prob) == (
        0.2, 0.2, 0.2,
    )  # fmt: skip
    mag = load_config("ms1mv2_r100_magface")
    assert (mag.head.loss, mag.model.network, mag.head.magface_lambda_g) == (
        "magface",
        "r100",
        35.0,
    )
