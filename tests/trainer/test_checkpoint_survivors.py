"""trainer.checkpoint: tests written against mutation survivors (issue 26).

* checkpoint files are read with ``weights_only``: a file holding a pickled object is
  refused, and the object's code never runs, even when its checksum is right;
* a ``meta.json`` that does not list its files makes the checkpoint incomplete: ``auto``
  skips it, saying why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.trainer.test_trainer import TensorLoader, dataset, make_cfg, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling it creates ``marker``: proof that a checkpoint file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _trainer(out: Path, *extra: str):
    x, y = dataset()
    return make_trainer(make_cfg(out, *extra), TensorLoader(x, y, 8, 0, 1))


def _rewrite(checkpoint: Path, name: str, obj: object) -> None:
    """Replace ``name`` with ``torch.save(obj)`` and record its real size and SHA-256 in
    ``meta.json``, so that only the reader's own rules can refuse it."""
    torch.save(obj, checkpoint / name)
    data = (checkpoint / name).read_bytes()
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"][name] = len(data)
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_file_holding_a_pickled_object_is_not_loaded(tmp_path: Path) -> None:
    _trainer(tmp_path, "train.max_steps=2", "checkpoint.every_steps=2").fit()
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    marker = tmp_path / "code-ran"
    _rewrite(checkpoint, "rank-00000.pt", {"rng": _Payload(marker)})
    t = _trainer(tmp_path / "other", f"checkpoint.resume={checkpoint}")
    with pytest.raises(Exception, match="holding objects other than tensors"):
        t.maybe_resume()
    assert not marker.exists() and t.step == 0


def test_a_meta_json_without_its_file_list_is_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _trainer(tmp_path, "train.max_steps=2", "checkpoint.every_steps=1").fit()
    newest = tmp_path / "checkpoints" / "step-00000002"
    meta = json.loads((newest / "meta.json").read_text())
    del meta["files"]
    (newest / "meta.json").write_text(json.dumps(meta))
    t = _trainer(tmp_path, "train.max_steps=2", "checkpoint.every_steps=1")
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume().name == "step-00000001" and t.step == 1
    assert "does not list its files" in caplog.text
