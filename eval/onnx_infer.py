"""onnxruntime inference for face-recognition models: ours, or anyone's.

How a model wants its input is settled once, when the session opens, in this
order (each item on its own):

1. an explicit option (``input_mean``, ``input_std``, ``input_color``,
   ``input_size``: the commands' ``--input-*`` flags);
2. the model's metadata: ``eval.export_onnx`` records ``input_mean`` /
   ``input_std`` (on 0..255 pixels), ``input_color`` and ``input_size``;
3. the insightface convention for models without metadata (its model packs, e.g.
   ``w600k_r50.onnx``): RGB input of the size in the graph's input shape, and
   ``(pixel - 127.5) / 127.5`` unless the graph normalises its input itself (a
   ``Sub`` and a ``Mul`` node among its first eight nodes), in which case raw
   0..255 pixels go in (mean 0, std 1).

The embedder then takes our pipeline's ``[-1, 1]`` RGB tensors, or uint8 faces,
resizes them to the model's input size when they differ, and converts them to the
model's normalisation and channel order.

What is refused, when the session opens, as a :class:`~eval.errors.ModelError` naming
the model: a file onnxruntime cannot load (not ONNX, empty, truncated, an invalid
graph); more or fewer than one input; an input that is not float (``float32`` or
``float16``) ``(batch, 3, H, W)``; a side over :data:`MAX_INPUT_SIDE` pixels; a first
output that is not ``(batch, D)``. A model with a fixed batch size runs in chunks of
that size (the last one padded by repeating its last face). Every output is checked
(:func:`eval.extract.check_embeddings`): a NaN or infinite embedding is a
:class:`~eval.errors.NonFiniteEmbeddingError`, never a similarity.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.face_input import ARCFACE_INPUT
from eval.errors import EvalUsageError, ModelError
from eval.extract import check_embeddings

#: A model without metadata reads arcface_torch's input (insightface's convention too).
DEFAULT_MEAN = ARCFACE_INPUT.mean
DEFAULT_STD = ARCFACE_INPUT.std
DEFAULT_SIZE = ARCFACE_INPUT.size
DEFAULT_COLOR = ARCFACE_INPUT.color
#: The largest side of a model input (and of ``--input-size``/``--image-size``), in
#: pixels: evaluation feeds aligned face crops (112 for the ArcFace template), and a
#: 1024x1024 float input already takes 12 MiB per face. The one cap of model input sizes.
MAX_INPUT_SIDE = 1024
#: onnxruntime's input element types the embedder can feed.
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
#: insightface looks for its in-graph normalisation among the first nodes only.
_NORMALISING_PREFIX_NODES = 8


def _providers(device: str) -> list[str | tuple[str, dict[str, Any]]]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        # "cuda:N" (a torchrun rank's cuda:LOCAL_RANK) selects GPU N, not always GPU 0
        _, _, index = device.partition(":")
        options = {"device_id": int(index)} if index else {}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception classes (InvalidGraph, InvalidProtobuf, Fail, ...)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
        "NotImplemented", "RuntimeException", "EngineError", "EPFail", "NotFound",
        "ModelRequiresCompilation",
    )  # fmt: skip
    return tuple(c for c in (getattr(state, n, None) for n in names) if isinstance(c, type))


def _ort_reason(exc: BaseException, path: str) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : N :`` and ``Load model
    from <path> failed:`` prefixes, on one line."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", text)
    text = text.replace(f"Load model from {path} failed:", "").strip()
    return text or type(exc).__name__


def normalises_in_graph(path: str) -> bool:
    """Whether the graph starts by normalising its input (insightface's test: node
    names beginning with ``Sub``/``_minus`` and ``Mul``/``_mul`` among the first eight)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from None
    nodes = proto.graph.node[:_NORMALISING_PREFIX_NODES]
    names = [node.name for node in nodes]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


def _input_hw(path: str, name: str, shape: list[Any], size: int | None) -> tuple[int, int]:
    """``(H, W)`` of a ``(batch, 3, H, W)`` input; symbolic sides take ``size`` (or 112).

    Sides are capped at :data:`MAX_INPUT_SIDE`: a larger side in the graph is a
    :class:`~eval.errors.ModelError`, a larger ``--input-size`` an
    :class:`~eval.errors.EvalUsageError` (both name the model and its input shape)."""
    channels_ok = len(shape) == 4 and (not isinstance(shape[1], int) or shape[1] == 3)
    sides = shape[2:] if len(shape) == 4 else []
    if not channels_ok or any(isinstance(s, int) and s < 1 for s in sides):
        raise ModelError(
            f"{path}: input {name!r} has shape {shape}; expected (batch, 3, H, W) "
            "(NCHW with 3 colour channels)"
        )
    fixed = [s for s in sides if isinstance(s, int)]
    if any(s > MAX_INPUT_SIDE for s in fixed):
        raise ModelError(
            f"{path}: input {name!r} has shape {shape}: sides over {MAX_INPUT_SIDE} pixels "
            "are refused (evaluation feeds aligned face crops; re-export the model with a "
            "smaller input)"
        )
    if size is not None and not 1 <= size <= MAX_INPUT_SIDE:
        raise EvalUsageError(
            f"--input-size {size}: must be 1 to {MAX_INPUT_SIDE} pixels (model {path}, "
            f"input {name!r} of shape {shape})"
        )
    if size is not None and fixed and any(s != size for s in fixed):
        raise EvalUsageError(
            f"--input-size {size} contradicts the input {name!r} of {path}: shape {shape}"
        )
    fallback = size if size is not None else DEFAULT_SIZE
    h, w = (s if isinstance(s, int) else fallback for s in sides)
    return h, w


def _metadata_float(path: str, meta: dict[str, str], key: str, default: float) -> float:
    try:
        return float(meta.get(key, default))
    except ValueError:
        raise ModelError(f"{path}: metadata {key}={meta[key]!r} is not a number") from None


class OnnxEmbedder:
    """An onnxruntime session usable wherever an :data:`~eval.extract.Embedder` is.

    Args:
        path: the ``.onnx`` file.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (falls back to CPU without the
            CUDA provider).
        intra_op_threads: onnxruntime intra-op threads (0 = its default).
        input_mean, input_std: the model's input is ``(pixel - mean) / std`` for 0..255
            pixels; None: from the metadata, else the insightface convention.
        input_color: ``"RGB"`` or ``"BGR"`` channel order; None: metadata, else RGB.
        input_size: the side of a square input for a model whose graph leaves it
            symbolic (a fixed size in the graph always wins and must agree).

    Raises:
        FileNotFoundError: no such file.
        ModelError: onnxruntime cannot load the file, or the model has not exactly one
            float ``(batch, 3, H, W)`` input (sides up to :data:`MAX_INPUT_SIDE`) and a
            ``(batch, D)`` first output.
        EvalUsageError: an ``input_*`` option out of range or contradicting the model.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "cpu",
        intra_op_threads: int = 0,
        *,
        input_mean: float | None = None,
        input_std: float | None = None,
        input_color: str | None = None,
        input_size: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(self.path, opts, providers=_providers(device))
        except _ort_errors() as exc:
            raise ModelError(
                f"{self.path}: onnxruntime cannot load this model: {_ort_reason(exc, self.path)}"
            ) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(repr(i.name) for i in inputs)
            raise ModelError(f"{self.path}: expected one input, found {len(inputs)} ({names})")
        self.input_name = inputs[0].name
        shape = list(inputs[0].shape)
        if inputs[0].type not in _FLOAT_INPUTS:
            raise ModelError(
                f"{self.path}: input {self.input_name!r} is {inputs[0].type} of shape {shape}; "
                "expected a float (float32 or float16) (batch, 3, H, W) image batch"
            )
        self.input_dtype = _FLOAT_INPUTS[inputs[0].type]
        self.input_hw = _input_hw(self.path, self.input_name, shape, input_size)
        #: the batch size the graph fixes (inputs run in chunks of it), or None
        batch = shape[0]
        self.fixed_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None
        output = self.session.get_outputs()[0]
        if output.shape is not None and len(output.shape) != 2:  # None: checked at run time
            raise ModelError(
                f"{self.path}: output {output.name!r} has shape {list(output.shape)}; "
                "expected (batch, D) embeddings"
            )
        self.output_name = output.name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        meta = self.metadata
        if "input_mean" in meta or "input_std" in meta:
            default_mean = _metadata_float(self.path, meta, "input_mean", DEFAULT_MEAN)
            default_std = _metadata_float(self.path, meta, "input_std", DEFAULT_STD)
        elif input_mean is None or input_std is None:
            in_graph = normalises_in_graph(self.path)
            default_mean, default_std = (0.0, 1.0) if in_graph else (DEFAULT_MEAN, DEFAULT_STD)
        else:
            default_mean, default_std = DEFAULT_MEAN, DEFAULT_STD
        self.mean = default_mean if input_mean is None else float(input_mean)
        self.std = default_std if input_std is None else float(input_std)
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise EvalUsageError(
                f"{self.path}: input std must be > 0 and both finite (mean {self.mean}, "
                f"std {self.std}; --input-mean/--input-std or the model's metadata)"
            )
        self.color = (input_color or meta.get("input_color", DEFAULT_COLOR)).upper()
        if self.color not in ("RGB", "BGR"):
            raise ModelError(
                f"{self.path}: metadata input_color must be RGB or BGR, got {self.color!r}"
            )

    @property
    def name(self) -> str:
        """The model's name in messages: its file."""
        return self.path

    def describe(self) -> str:
        """One line: how inputs are fed to this model."""
        h, w = self.input_hw
        batch = f", fixed batch {self.fixed_batch}" if self.fixed_batch is not None else ""
        return (
            f"{self.path}: input {self.input_name} {self.color} {h}x{w}, "
            f"(pixel - {self.mean:g}) / {self.std:g}{batch}"
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw model output, unchecked: float ``(B, 3, H, W)`` input already in the model's
        normalisation, channel order and size -> ``(B, D)``. A fixed-batch model runs in
        chunks of its batch size, the last one padded by repeating its last row."""
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        step = self.fixed_batch
        if step is None or len(x) == step:
            return self._run(x)
        outs = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            n = len(chunk)
            if n < step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            outs.append(self._run(chunk)[:n])
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        except _ort_errors() as exc:
            raise ModelError(
                f"{self.path}: onnxruntime failed on a batch of shape {list(x.shape)}: "
                f"{_ort_reason(exc, self.path)}"
            ) from None
        return np.asarray(out, dtype=np.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embedder protocol: float ``(B, 3, h, w)`` RGB in ``[-1, 1]`` -> float32 ``(B, D)``.

        The faces are resized to the model's input size if they differ, then mapped
        back to 0..255 pixels and into the model's normalisation and channel order.
        """
        x = x.detach().float().cpu()
        if tuple(x.shape[-2:]) != self.input_hw:
            x = F.interpolate(x, size=self.input_hw, mode="bilinear", align_corners=False)
        if self.color == "BGR":
            x = x.flip(1)
        pixels = x * ARCFACE_INPUT.std + ARCFACE_INPUT.mean  # our pipeline's [-1, 1]
        out = self.run(((pixels - self.mean) / self.std).numpy())
        return torch.from_numpy(check_embeddings(out, self.path, x.shape[0]))

    def embed_faces(self, faces: np.ndarray, *, bgr: bool = False) -> np.ndarray:
        """L2-normalised embeddings of aligned faces.

        Args:
            faces: uint8 ``(B, h, w, 3)`` or ``(h, w, 3)`` aligned face crops,
                RGB (or BGR as read by OpenCV with ``bgr=True``); resized to the
                model's input size when they differ.
        Returns:
            float32 ``(B, D)`` unit-norm embeddings.
        Raises:
            NonFiniteEmbeddingError: the model gave NaN or infinity for a face.
        """
        faces = np.asarray(faces)
        if faces.ndim == 3:
            faces = faces[None]
        if faces.ndim != 4 or faces.shape[-1] != 3:
            raise ValueError(f"faces must be (B, H, W, 3), got {faces.shape}")
        if bgr != (self.color == "BGR"):
            faces = faces[..., ::-1]
        h, w = self.input_hw
        if faces.shape[1:3] != (h, w):
            import cv2

            faces = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) for f in faces])
        x = (faces.astype(np.float32) - self.mean) / self.std
        emb = check_embeddings(self.run(x.transpose(0, 3, 1, 2)), self.path, len(faces))
        norm = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.maximum(norm, 1e-12)).astype(np.float32)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--input-*`` overrides of an ONNX model's input convention."""
    group = parser.add_argument_group(
        "ONNX input (default: the model's metadata, else the insightface convention)"
    )
    group.add_argument("--input-mean", type=float, help="model input = (pixel - mean) / std")
    group.add_argument("--input-std", type=float, help="see --input-mean")
    group.add_argument("--input-color", choices=["RGB", "BGR"], help="channel order")
    group.add_argument("--input-size", type=int, help="side of a symbolic-size input")


def input_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``OnnxEmbedder`` keyword arguments given by :func:`add_input_arguments`' flags."""
    return {
        "input_mean": args.input_mean,
        "input_std": args.input_std,
        "input_color": args.input_color,
        "input_size": args.input_size,
    }
