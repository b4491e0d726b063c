"""The model folder (issue 29, item 3): ``python -m eval.export`` writes weights, config,
ONNX and a model card; ``backbones.pretrained.from_pretrained`` and the eval commands load
it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

from backbones.pretrained import ModelFolderError, from_pretrained
from backbones.registry import get_model
from backbones.weights import BackboneWeightsError, save_backbone_weights
from common.cli import run_main
from common.errors import UsageError
from common.face_input import ARCFACE_INPUT
from common.version import PROJECT_VERSION
from configs import config_to_dict, load_preset
from eval import export as export_cli
from eval import ijb, model_folder, verification
from eval import verification as verification_cli
from eval.faces import open_model
from eval.models import make_embedder
from eval.onnx_infer import OnnxEmbedder

NETWORK = "mbf_tiny"


def _trained_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_model(NETWORK, embedding_size=128)
    with torch.no_grad():  # BatchNorm statistics away from their defaults
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished training run's directory: config.json, backbone.pt, verification.json."""
    out = tmp_path_factory.mktemp("run")
    cfg = config_to_dict(load_preset("demo"))
    cfg["model"]["embedding_size"] = 128
    cfg["model"]["kwargs"] = {"checkpoint": False}  # training only: not in the folder
    (out / "config.json").write_text(json.dumps(cfg))
    history = [
        {"step": 0, "results": {"heldout": {"accuracy": 0.5, "accuracy_std": 0.01}}},
        {"step": 374, "results": {"heldout": {"accuracy": 0.96833, "accuracy_std": 0.0123}}},
    ]
    (out / "verification.json").write_text(json.dumps(history))
    model = _trained_model()
    save_backbone_weights(model.state_dict(), out / "backbone.pt")
    return out, model


@pytest.fixture(scope="module")
def folder(run_dir, tmp_path_factory):
    run, model = run_dir
    out = tmp_path_factory.mktemp("models") / "demo"
    assert export_cli.main([str(run), "--out", str(out), "--exporter", "torchscript"]) == out
    return out, model


def test_folder_round_trip_config_weights_and_card(folder) -> None:
    out, model = folder
    assert sorted(p.name for p in out.iterdir()) == [
        ".owner.json", "README.md", "config.json", "model.onnx", "model.safetensors"
    ]  # fmt: skip
    owner = json.loads((out / ".owner.json").read_text())
    assert owner["command"] == "eval.export" and owner["complete"] is True
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["network"] == NETWORK and cfg["embedding_size"] == 128
    assert cfg["model_kwargs"] == {}
    assert cfg["input"] | {} == {
        **cfg["input"], "size": 112, "mean": 127.5, "std": 127.5, "color": "RGB", "layout": "NCHW"
    }  # fmt: skip
    assert cfg["training_data"] == {
        "root": "data/synthetic",
        "num_classes": 400,
        "num_images": 12000,
    }
    assert cfg["head"]["loss"] == "arcface" and cfg["head"]["margin"] == 0.3
    assert cfg["head"]["scale"] == 32.0
    assert cfg["project_version"] == PROJECT_VERSION
    # arcface_torch's names, the same tensors
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert "features.layers.3.weight" in keys and "layers.0.layers.0.weight" in keys
        assert keys == set(model.state_dict())
        assert torch.equal(
            fh.get_tensor("conv_sep.layers.0.weight"), model.conv_sep.layers[0].weight
        )
    loaded = from_pretrained(out)
    assert not loaded.training
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    card = (out / "README.md").read_text()
    assert "| heldout | 0.96833 | 0.01230 |" in card and "step 374" in card
    assert "license: FILL IN" in card and "## Training recipe" in card


def test_folder_onnx_has_the_input_spec_and_matches_pytorch(folder) -> None:
    out, model = folder
    meta = {p.key: p.value for p in onnx.load(out / "model.onnx").metadata_props}
    assert meta["input_mean"] == "127.5" and meta["input_std"] == "127.5"
    assert meta["input_color"] == "RGB" and meta["input_size"] == "112x112"
    assert meta["network"] == NETWORK and meta["embedding_size"] == "128"
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    got = OnnxEmbedder(out / "model.onnx").run(x.numpy())
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.max(np.abs(got - ref)) < 1e-4


def test_eval_loads_the_folder(folder) -> None:
    out, model = folder
    faces = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float()
    embedder = make_embedder(checkpoint=out)  # no --network: the folder names it
    embedder_b, side = open_model(out)
    assert side == ARCFACE_INPUT.size
    args = verification_cli._parse_args(["--model", str(out), "--bin", "x.bin"])  # no --network
    assert args.checkpoint == str(out) and args.network is None
    with torch.no_grad():
        ref = model((x - 127.5) / 127.5).numpy()
        for emb in (embedder, embedder_b):
            got = emb((x - 127.5) / 127.5)
            got = got.numpy() if isinstance(got, torch.Tensor) else got
            assert np.allclose(got, ref, atol=1e-5)


def test_folder_whose_config_and_weights_disagree_names_the_files(folder, tmp_path) -> None:
    out, _ = folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"embedding_size": 512}))
    with pytest.raises(
        BackboneWeightsError, match=r"bad/model\.safetensors \(against .*bad/config\.json"
    ):
        from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(cfg | {"network": "r18"}))
    with pytest.raises(BackboneWeightsError, match=r"model\.safetensors .*network 'r18'"):
        from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(cfg | {"network": "nope"}))
    with pytest.raises(ModelFolderError, match=r"bad/config\.json: network 'nope'"):
        from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(cfg | {"input": {**cfg["input"], "std": 1.0}}))
    with pytest.raises(ModelFolderError, match=r"config\.json: input .* differs"):
        from_pretrained(bad)
    (bad / "config.json").write_text("{")
    with pytest.raises(ModelFolderError, match=r"config\.json: not a JSON file"):
        from_pretrained(bad)
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: no such file"):
        from_pretrained(bad)


def test_export_sources(run_dir, tmp_path) -> None:
    run, model = run_dir
    # a checkpoint's trainer.pt: the backbone, config and history it records
    ckpt = tmp_path / "step-000010"
    ckpt.mkdir()
    cfg = json.loads((run / "config.json").read_text())
    torch.save(
        {"backbone": model.state_dict(), "config": json.dumps(cfg), "history": "[]"},
        ckpt / "trainer.pt",
    )
    source = model_folder.find_source(ckpt)
    assert source.weights == ckpt / "trainer.pt" and source.training["model"]["network"] == NETWORK
    # a bare weights file needs --network
    bare = tmp_path / "bare" / "w.safetensors"
    bare.parent.mkdir()
    save_backbone_weights(model.state_dict(), bare)
    with pytest.raises(UsageError, match=r"w\.safetensors: no training config\.json .*--network"):
        model_folder.export_folder(model_folder.find_source(bare), tmp_path / "out")
    with pytest.raises(model_folder.ExportError, match=r"holds neither backbone"):
        model_folder.find_source(tmp_path / "bare")


def test_export_owns_its_folder(run_dir, tmp_path, capsys) -> None:
    """A folder holding someone's files is refused, naming them, and left untouched;
    --overwrite writes into it and keeps the other files; a rerun replaces its own."""
    run, _ = run_dir
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = [str(run), "--out", str(out), "--exporter", "torchscript"]
    assert run_main(export_cli.main, argv, prog="eval.export") == 1
    err = capsys.readouterr().err
    assert "--out=" in err and "not made by eval.export (it holds notes.txt)" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_cli.main([*argv, "--overwrite"])
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.onnx").exists()
    export_cli.main(argv)  # its own folder now: no --overwrite needed


def test_ijb_and_verification_take_a_model_folder_without_network(folder, tmp_path) -> None:
    """``--model DIR`` names a model folder; a file still needs --network."""
    out, _ = folder
    args = ijb._parse_args(["--root", str(tmp_path), "--model", str(out), "--output-dir", "o"])
    assert args.checkpoint == str(out) and args.network is None
    with pytest.raises(SystemExit):
        ijb._parse_args(
            ["--root", "r", "--model", str(out / "model.safetensors"), "--output-dir", "o"]
        )
    args = verification._parse_args(["--model", str(out), "--bin", "x.bin"])
    assert args.checkpoint == str(out)
