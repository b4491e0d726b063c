"""Exporting a backbone to ONNX (:func:`export_onnx`) and checking the file against
PyTorch with onnxruntime (:func:`check_parity`): the library of the ``eval.export_onnx``
and ``eval.export`` commands (see ``eval.export_onnx`` for the graph's input, output and
metadata)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_path
from common.errors import UserError
from common.face_input import ARCFACE_INPUT, InputSpec
from eval.onnx_infer import OnnxEmbedder
from eval.onnx_options import EXPORTERS, OUR_EXPORT_KEY

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"


class ParityError(UserError, ValueError):
    """The exported model and PyTorch cannot be compared: an output is not finite, or
    the shapes differ."""


def normalization_metadata(
    image_size: tuple[int, int], embedding_size: int, spec: InputSpec = ARCFACE_INPUT
) -> dict[str, str]:
    """The metadata recorded in every exported model: the input ``spec`` (normalisation,
    colour order) at ``image_size``. Its :data:`~eval.onnx_options.OUR_EXPORT_KEY` entry
    marks the file as exported by this project (``eval.calibrate --into-model``)."""
    return {
        "input_mean": f"{spec.mean:g}",
        "input_std": f"{spec.std:g}",
        "input_color": spec.color,
        "input_layout": "NCHW",
        "input_size": f"{image_size[0]}x{image_size[1]}",
        OUR_EXPORT_KEY: f"(pixel - {spec.mean:g}) / {spec.std:g}, pixel in [0, 255]",
        "output": "embedding, not L2-normalised",
        "embedding_size": str(embedding_size),
    }


class _DropMissingTorchvision(logging.Filter):
    """Drops the exporter's "torchvision is not installed. Skipping torchvision::nms"
    records (one per torchvision op: nms, roi_align, roi_pool, deform_conv2d).

    Building the dynamo exporter's default op registry looks up torchvision's
    custom ops and logs a warning for each when torchvision is absent. Backbones
    use no torchvision op and torchvision is not a dependency, so the records say
    nothing about the export; there is no export option to skip the lookup.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


# The logger of torch/onnx/_internal/exporter/_registration.py.
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def _quiet_exporter(exporter: str) -> Iterator[None]:
    """Silence the exporter's messages that do not concern the exported model."""
    registry_log = logging.getLogger(_REGISTRY_LOGGER)
    drop = _DropMissingTorchvision()
    registry_log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            # torch's own deep copy of the exported program's pytree specs trips
            # torch's deprecation of isinstance(spec, LeafSpec); nothing of ours.
            warnings.filterwarnings(
                "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
            )
            if exporter == "torchscript":
                # Chosen explicitly (--exporter torchscript, documented as torch's
                # legacy exporter): its deprecation notices tell the user nothing new.
                warnings.filterwarnings("ignore", r".*legacy TorchScript", DeprecationWarning)
                warnings.filterwarnings("ignore", "", DeprecationWarning, r"torch\.onnx\.")
            yield
    finally:
        registry_log.removeFilter(drop)


def _torch_export(
    model: nn.Module, dummy: torch.Tensor, path: str, opset: int | None, exporter: str
) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    with _quiet_exporter(exporter):
        if exporter == "dynamo":
            try:
                # dynamic_shapes (not the TorchScript-era dynamic_axes, which dynamo
                # converts with a deprecation warning): a symbolic batch axis.
                batch = torch.export.Dim("batch")
                torch.onnx.export(
                    model,
                    (dummy,),
                    path,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                    dynamic_shapes=({0: batch},),
                    **names,
                )
                return
            except Exception as exc:  # the dynamo exporter cannot trace everything
                print(f"dynamo export failed ({type(exc).__name__}: {exc}); using TorchScript")
        dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        torch.onnx.export(model, (dummy,), path, dynamo=False, dynamic_axes=dynamic_axes, **names)


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike[str],
    *,
    spec: InputSpec = ARCFACE_INPUT,
    image_size: tuple[int, int] | None = None,
    metadata: dict[str, str] | None = None,
    opset: int | None = None,
    exporter: str = "dynamo",
) -> str:
    """Export ``model`` (``(B, 3, H, W)`` -> ``(B, D)``) to ``output`` atomically.

    Args:
        model: the backbone; exported on CPU in eval mode.
        output: the ``.onnx`` file (weights embedded; models must be < 2 GB).
        spec: the model's input (its registry entry's
            :func:`~backbones.registry.input_spec`), recorded in the metadata.
        image_size: ``(H, W)`` of the input; None: ``spec``'s.
        metadata: extra metadata entries, added to :func:`normalization_metadata`.
        opset: ONNX opset, or the exporter's default.
        exporter: ``"dynamo"`` (``torch.export``-based, the default; falls back
            to TorchScript if tracing fails) or ``"torchscript"`` (legacy, fast).
    Returns:
        The output path.
    """
    import onnx

    output = os.fspath(output)
    image_size = image_size or (spec.size, spec.size)
    model = model.cpu().eval()
    dummy = torch.randn(2, 3, *image_size)
    with torch.no_grad():
        dim = int(model(dummy).shape[1])
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".onnx-export-") as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        _torch_export(model, dummy, raw, opset, exporter)
        proto = onnx.load(raw)
        meta = normalization_metadata(image_size, dim, spec) | (metadata or {})
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        # The one home for atomic writes: fsynced, named on failure, no temporary left.
        with atomic_path(output) as final:
            onnx.save(proto, str(final))
            onnx.checker.check_model(str(final))
    return output


def check_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] = (ARCFACE_INPUT.size, ARCFACE_INPUT.size),
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
) -> float:
    """Max absolute difference between onnxruntime and PyTorch outputs on random inputs.

    Raises :class:`ParityError` if either side produces a non-finite value (NaN or
    infinity): such a difference is not a number, and ``max`` would silently drop it.
    """
    session = OnnxEmbedder(onnx_path)
    model = model.cpu().eval()
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch_sizes:
        x = torch.rand((b, 3, *image_size), generator=g) * 2 - 1
        with torch.no_grad():
            ref = model(x).float().numpy()
        got = session.run(x.numpy())
        if got.shape != ref.shape:
            raise ParityError(f"{onnx_path}: output shape {got.shape} != PyTorch {ref.shape}")
        for side, out in (("PyTorch", ref), ("onnxruntime", got)):
            bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
            if bad:
                raise ParityError(
                    f"{onnx_path}: {side} produced {bad} non-finite values (NaN/inf) of "
                    f"{np.size(out)} on a batch of {b} random inputs; the model (or its "
                    "checkpoint) is broken, so parity cannot be checked"
                )
        worst = max(worst, float(np.max(np.abs(got - ref))))
    return worst
