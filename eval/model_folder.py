"""Model folders (weights, config, ONNX, model card) from a training run, a checkpoint or
a weights file: the library of the ``eval.export`` command (see it for the folder's
files), which imports it after parsing its arguments."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backbones.pretrained import (
    MODEL_CARD,
    MODEL_CONFIG,
    MODEL_ONNX,
    MODEL_WEIGHTS,
    from_pretrained,
    model_config,
)
from backbones.registry import input_spec
from backbones.weights import save_backbone_weights
from common.atomic import write_json, write_text
from common.errors import UsageError, UserError
from common.outdir import OwnedDir
from common.version import PROJECT_VERSION
from eval.models import build_backbone
from eval.onnx_export import check_parity, export_onnx

#: The weights a training output directory holds, in the order looked for.
TRAINING_WEIGHTS = ("backbone.safetensors", "backbone.pt")
#: A checkpoint directory's file holding the backbone, the config and the history.
CHECKPOINT_FILE = "trainer.pt"

#: Worst onnxruntime-vs-PyTorch difference accepted for the exported ``model.onnx``.
PARITY_TOLERANCE = 1e-3

LICENSE_PLACEHOLDER = "FILL IN (the licence of the weights and of the training data)"


class ExportError(UserError, ValueError):
    """What to export cannot be found or understood; the message names the path."""


@dataclass
class Source:
    """What a model folder is made from: the weights file, the training config (a dict
    as ``config.json`` holds it; empty when unknown) and the verification history."""

    weights: Path
    training: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not a JSON file ({exc})") from None


def _from_checkpoint_file(path: Path) -> Source:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader error: name the file
        raise ExportError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    source = Source(path)
    if isinstance(obj, dict):
        if isinstance(obj.get("config"), str):
            source.training = json.loads(obj["config"])
        if isinstance(obj.get("history"), str):
            source.history = json.loads(obj["history"])
    return source


def find_source(path: str | os.PathLike[str]) -> Source:
    """The :class:`Source` that ``path`` (see the module's documentation) names.

    Raises:
        FileNotFoundError: no such path.
        ExportError: a directory holding neither a run's weights nor a checkpoint.
    """
    p = Path(path)
    if p.is_dir():
        if (p / CHECKPOINT_FILE).is_file():
            return _from_checkpoint_file(p / CHECKPOINT_FILE)
        weights = next((p / n for n in TRAINING_WEIGHTS if (p / n).is_file()), None)
        if weights is None:
            raise ExportError(
                f"{p}: holds neither {' nor '.join(TRAINING_WEIGHTS)} (a finished training "
                f"run) nor {CHECKPOINT_FILE} (a checkpoint directory)"
            )
        source = Source(weights)
        if (p / "config.json").is_file():
            source.training = _read_json(p / "config.json")
        if (p / "verification.json").is_file():
            source.history = _read_json(p / "verification.json")
        return source
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.name == CHECKPOINT_FILE:
        return _from_checkpoint_file(p)
    source = Source(p)
    if (p.parent / "config.json").is_file():
        source.training = _read_json(p.parent / "config.json")
        if (p.parent / "verification.json").is_file():
            source.history = _read_json(p.parent / "verification.json")
    return source


def _section(training: dict[str, Any], name: str) -> dict[str, Any]:
    value = training.get(name)
    return value if isinstance(value, dict) else {}


def folder_facts(training: dict[str, Any]) -> dict[str, Any]:
    """The facts about training that ``config.json`` records (empty sections when the
    training config is unknown)."""
    head, data = _section(training, "head"), _section(training, "data")
    optimizer, train = _section(training, "optimizer"), _section(training, "train")
    head_keys = ("loss", "scale", "margin", "m1", "m2", "m3", "sample_rate", "num_subcenters")
    return {
        "training_data": {k: data[k] for k in ("root", "num_classes", "num_images") if k in data},
        "head": {k: head[k] for k in head_keys if k in head},
        "recipe": {
            "name": training.get("name"),
            "optimizer": {
                k: optimizer[k] for k in ("name", "lr", "weight_decay") if k in optimizer
            },
            "epochs": train.get("epochs"),
            "batch_size_per_rank": data.get("batch_size"),
        }
        if training
        else {},
        "project_version": PROJECT_VERSION,
    }


def _results_table(history: list[dict[str, Any]]) -> list[str]:
    if not history:
        return ["No verification results were recorded during training."]
    last = history[-1]
    lines = [
        f"Recorded during training at step {last.get('step')} (`verification.json`; "
        "10-fold accuracy on the pair targets):",
        "",
        "| target | accuracy | std |",
        "|---|---|---|",
    ]
    for name, r in sorted((last.get("results") or {}).items()):
        acc, std = r.get("accuracy"), r.get("accuracy_std")
        acc_text = f"{acc:.5f}" if isinstance(acc, float | int) else "?"
        std_text = f"{std:.5f}" if isinstance(std, float | int) else ""
        lines.append(f"| {name} | {acc_text} | {std_text} |")
    return lines


def model_card(cfg: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """``README.md`` of a model folder: the model, its input, the verification results,
    the recipe and a licence field for the user."""
    spec = cfg["input"]
    recipe = cfg.get("recipe") or {}
    lines = [
        "---",
        f"license: {LICENSE_PLACEHOLDER}",
        "library_name: partial-fc",
        "tags: [face-recognition, arcface]",
        "---",
        "",
        f"# {cfg['network']} face embedding ({cfg['embedding_size']}-d)",
        "",
        f"Exported by `python -m eval.export` (project version {cfg['project_version']}).",
        "",
        "## Input",
        "",
        f"- {spec['size']}x{spec['size']} aligned face crops (ArcFace 5-point template), "
        f"{spec['color']}, {spec['layout']}",
        f"- pixels as `{spec['formula']}`",
        f"- output: {cfg['embedding_size']}-d embedding, not L2-normalised",
        "",
        "## Files",
        "",
        f"- `{MODEL_WEIGHTS}`: PyTorch weights with arcface_torch's parameter names",
        f"- `{MODEL_CONFIG}`: network, input spec, training facts",
        f"- `{MODEL_ONNX}`: the same model in ONNX, the input spec in its metadata",
        "",
        "```python",
        "from backbones.pretrained import from_pretrained",
        "model = from_pretrained('MODEL_DIR')",
        "```",
        "",
        "## Verification",
        "",
        *_results_table(history),
        "",
        "## Training recipe",
        "",
        f"- data: `{json.dumps(cfg.get('training_data') or 'unknown')}`",
        f"- head and margin: `{json.dumps(cfg.get('head') or 'unknown')}`",
        f"- recipe: `{json.dumps(recipe or 'unknown')}`",
        "",
        "## Licence",
        "",
        f"{LICENSE_PLACEHOLDER}",
        "",
    ]
    return "\n".join(lines)


def export_folder(
    source: Source,
    out: str | os.PathLike[str],
    *,
    network: str | None = None,
    exporter: str = "dynamo",
    overwrite: bool = False,
) -> tuple[Path, float]:
    """Write the model folder ``out`` from ``source``; ``network`` overrides (or supplies)
    the training config's. Returns the folder and the ONNX-vs-PyTorch max abs difference
    (checked on the model read back from the folder).

    ``out`` is owned (:class:`common.outdir.OwnedDir`): a non-empty folder that
    ``eval.export`` did not make is refused unless ``overwrite``, and it is locked while
    written; its manifest says ``complete`` once the model card, the last file, is in."""
    model_section = _section(source.training, "model")
    network = network or model_section.get("network")
    if not network:
        raise UsageError(
            f"{source.weights}: no training config.json names the network; give --network"
        )
    kwargs = {k: v for k, v in (model_section.get("kwargs") or {}).items() if k != "checkpoint"}
    # the embedding size is read off the weights; the weights are checked against the network
    model = build_backbone(network, source.weights, **kwargs)
    spec = input_spec(network)
    with torch.no_grad():
        embedding_size = int(model(torch.zeros(1, 3, spec.size, spec.size)).shape[1])
    cfg = model_config(network, embedding_size, kwargs, **folder_facts(source.training))
    out = Path(out)
    with OwnedDir(out, "eval.export", "--out", overwrite=overwrite) as owned:
        owned.record(MODEL_WEIGHTS, MODEL_CONFIG, MODEL_ONNX, MODEL_CARD)
        diff = _write_folder(out, model, network, spec, cfg, source, exporter)
        owned.commit()
    return out, diff


def _write_folder(
    out: Path,
    model: torch.nn.Module,
    network: str,
    spec: Any,
    cfg: dict[str, Any],
    source: Source,
    exporter: str,
) -> float:
    save_backbone_weights(model.state_dict(), out / MODEL_WEIGHTS)
    write_json(out / MODEL_CONFIG, cfg, sort_keys=False)
    loaded = from_pretrained(out)  # the folder as a user will read it
    meta = {"network": network, "project_version": PROJECT_VERSION}
    export_onnx(loaded, out / MODEL_ONNX, spec=spec, metadata=meta, exporter=exporter)
    diff = check_parity(loaded, out / MODEL_ONNX, image_size=(spec.size, spec.size))
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"{out / MODEL_ONNX}: onnxruntime and PyTorch differ by {diff:.3e} "
            f"(> {PARITY_TOLERANCE:g}); the ONNX export of {network} is wrong"
        )
    write_text(out / MODEL_CARD, model_card(cfg, source.history))
    return diff
