"""Checkpoint loading for the eval commands."""

from __future__ import annotations

import pytest
import torch

from eval.models import build_backbone, load_state_dict
from tests.eval.test_eval_verification import TinyNet


def test_load_state_dict_strips_ddp_prefix_and_names_bad_files(tmp_path, monkeypatch):
    from backbones import registry

    model = TinyNet()
    ddp_style = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, ddp_style)
    assert set(load_state_dict(ddp_style)) == set(model.state_dict())

    monkeypatch.setattr(registry, "get_model", lambda name, **kw: TinyNet())
    loaded = build_backbone("tiny", ddp_style)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pt \(network 'tiny'\): weights of another"):
        build_backbone("tiny", wrong)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ValueError, match=r"list\.pt: expected a state_dict"):
        load_state_dict(not_dict)
    pickled_object = tmp_path / "object.pt"
    torch.save({"model": TinyNet()}, pickled_object)  # not loadable with weights_only
    with pytest.raises(ValueError, match=r"object\.pt: refused: the file holds objects") as info:
        load_state_dict(pickled_object)
    assert "weights_only" not in str(info.value)  # not torch's advice to run the file
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no such weights file"):
        load_state_dict(tmp_path / "missing.pt")
