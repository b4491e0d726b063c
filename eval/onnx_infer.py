"""onnxruntime inference for face-recognition models: ours, or anyone's.

How a model wants its input is settled once, when the session opens, in this
order (each item on its own):

1. an explicit option (``input_mean``, ``input_std``, ``input_color``,
   ``input_size``: the commands' ``--input-*`` flags);
2. the model's metadata: ``eval.export_onnx`` records ``input_mean`` /
   ``input_std`` (on 0..255 pixels), ``input_color`` and ``input_size``;
3. the graph's structure (never its node names): the ops that consume the input are
   followed (:func:`read_graph_input`) through ``Cast``/``Identity``, a ``Transpose``,
   ``Sub``/``Add``/``Mul``/``Div`` with a constant scalar or per-channel operand
   (initializer or ``Constant`` node) and channel permutations (``Gather``, or
   ``Split`` then ``Concat``). If they normalise raw pixels
   (:attr:`GraphInput.normalises`), raw 0..255 pixels go in (mean 0, std 1); if they
   reverse the channels, BGR goes in (the network behind them reads RGB); a first
   ``Transpose`` NHWC->NCHW makes the input ``(batch, H, W, 3)``;
4. the insightface convention (its model packs, e.g. ``w600k_r50.onnx``): RGB input of
   the size in the graph's input shape, ``(pixel - 127.5) / 127.5``.

:attr:`OnnxEmbedder.sources` says where each part came from; :meth:`OnnxEmbedder.describe`
prints it in one line and :meth:`OnnxEmbedder.convention` gives it as JSON.

The embedder then takes our pipeline's ``[-1, 1]`` RGB tensors, or uint8 faces,
resizes them to the model's input size when they differ, and converts them to the
model's normalisation and channel order.

What is refused, when the session opens, as a :class:`~eval.errors.ModelError` naming
the model: a file onnxruntime cannot load (not ONNX, empty, truncated, an invalid
graph); more or fewer than one input; an input that is not float (``float32`` or
``float16``) ``(batch, 3, H, W)`` (or ``(batch, H, W, 3)`` transposed by its first op);
a side over :data:`MAX_INPUT_SIDE` pixels; a first
output that is not ``(batch, D)``. A model with a fixed batch size runs in chunks of
that size (the last one padded by repeating its last face). Every output is checked
(:func:`eval.extract.check_embeddings`): a NaN or infinite embedding is a
:class:`~eval.errors.NonFiniteEmbeddingError`, never a similarity.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.face_input import ARCFACE_INPUT
from eval.errors import EvalUsageError, ModelError
from eval.extract import check_embeddings
from eval.onnx_options import MAX_INPUT_SIDE

__all__ = ["GraphInput", "OnnxEmbedder"]

#: A model without metadata reads arcface_torch's input (insightface's convention too).
DEFAULT_MEAN = ARCFACE_INPUT.mean
DEFAULT_STD = ARCFACE_INPUT.std
DEFAULT_SIZE = ARCFACE_INPUT.size
DEFAULT_COLOR = ARCFACE_INPUT.color
#: onnxruntime's input element types the embedder can feed.
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


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


#: How far :func:`read_graph_input` follows the ops that consume the input.
_MAX_LEADING_OPS = 16
#: The affine ops whose constant operand a leading normalisation is made of.
_AFFINE_OPS = ("Sub", "Add", "Mul", "Div")


@dataclass(frozen=True)
class GraphInput:
    """What the ops that consume a graph's input do to it, read from the graph's structure
    (op types and constants, never node names): :func:`read_graph_input`.

    The graph maps each fed channel ``c`` (in feeding order) to ``scale[c] * x + offset[c]``,
    reorders the channels by ``order`` (graph channel ``i`` is fed channel ``order[i]``)
    and, with ``nhwc``, takes ``(batch, H, W, 3)`` input that its first op transposes.

    Attributes:
        scale, offset: per fed channel (identity: 1 and 0).
        order: the channel permutation the leading ops apply ((0, 1, 2): none).
        nhwc: the input is ``(batch, H, W, 3)`` and a Transpose makes it NCHW.
        ops: the op types followed, in order (for messages).
    """

    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    order: tuple[int, int, int] = (0, 1, 2)
    nhwc: bool = False
    ops: tuple[str, ...] = ()

    @property
    def affine(self) -> bool:
        """Whether the leading ops change the pixel values at all."""
        return self.scale != (1.0, 1.0, 1.0) or self.offset != (0.0, 0.0, 0.0)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per fed channel: the graph computes ``(x - mean) / std``."""
        return tuple(-b / a for a, b in zip(self.scale, self.offset, strict=True))

    @property
    def std(self) -> tuple[float, ...]:
        """See :attr:`mean`."""
        return tuple(1.0 / a for a in self.scale)

    @property
    def normalises(self) -> bool:
        """Whether the graph normalises raw 0..255 pixels itself, so that raw pixels must go
        in: its leading affine map is not the identity and, on every channel, either
        subtracts a pixel-scale mean (1 to 255 in input units) or maps 0..255 into
        [-8, 8]. (A map that does neither, e.g. ``x * 0.5 + 0.5``, expects input that is
        already normalised: the default convention applies.)"""
        if not self.affine:
            return False
        for a, b, mean in zip(self.scale, self.offset, self.mean, strict=True):
            small = max(abs(b), abs(a * 255 + b)) <= 8
            if not (small or 1 <= mean <= 255):
                return False
        return True

    @property
    def swaps_channels(self) -> bool:
        """Whether the graph reverses the channel order first (fed BGR becomes RGB)."""
        return self.order == (2, 1, 0)

    def describe(self) -> str:
        """The leading ops in words: ``Transpose NHWC->NCHW, Sub, Mul: (x - 127.5) / 128``."""
        parts = ["Transpose NHWC->NCHW"] if self.nhwc else []
        parts += [op for op in self.ops if op != "Transpose"]
        mean, std = _fmt(self.mean), _fmt(self.std)
        what = f"(x - {mean}) / {std}" if self.affine else "no normalisation"
        if self.swaps_channels:
            what += ", channels reversed"
        return f"{', '.join(parts) or 'no leading op'}: {what}"


def _fmt(values: tuple[float, ...]) -> str:
    if len(set(values)) == 1:
        return f"{values[0]:g}"
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """The graph's constant tensors: initializers and ``Constant`` nodes' outputs."""
    from onnx import helper, numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value":
                found[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                found[node.output[0]] = np.asarray(helper.get_attribute_value(attr))
    return found


def _per_channel(value: np.ndarray, axis: int) -> np.ndarray | None:
    """A constant operand as 3 per-channel values along ``axis`` of a rank-4 tensor, or
    None when it is not a scalar or per-channel broadcast."""
    value = np.asarray(value, dtype=np.float64)
    if value.size == 1:
        return np.full(3, float(value.reshape(-1)[0]))
    if value.ndim > 4:
        return None
    full = value.reshape((1,) * (4 - value.ndim) + value.shape)
    if full.shape[axis] != 3 or any(s != 1 for i, s in enumerate(full.shape) if i != axis):
        return None
    return full.reshape(3)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def read_graph_input(proto: Any, input_name: str, rank: int = 4) -> GraphInput:
    """Follow the ops that consume ``input_name`` while each is the only consumer of its
    input (besides ``Shape`` ops) and is a ``Cast``/``Identity``, a ``Transpose``, a
    ``Sub``/``Add``/``Mul``/``Div`` with a constant (initializer or ``Constant`` node)
    scalar or per-channel operand, or a channel permutation (``Gather`` of constant
    indices, or ``Split`` into the 3 channels then ``Concat`` in another order); return
    what they do (:class:`GraphInput`)."""
    graph = proto.graph
    consts = _constants(graph)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    scale, offset = np.ones(3), np.zeros(3)
    order = np.arange(3)
    axis, nhwc, ops = 1, False, []
    cur = input_name
    for _ in range(_MAX_LEADING_OPS):
        # a Shape op reads the tensor's shape, not its values: it changes nothing
        users = [n for n in consumers.get(cur, []) if n.op_type != "Shape"]
        if len(users) != 1 or rank != 4:
            break
        node = users[0]
        op = node.op_type
        if op in ("Cast", "Identity"):
            pass
        elif op == "Transpose":
            perm = list(_attr(node, "perm", [3, 2, 1, 0]))
            if sorted(perm) != [0, 1, 2, 3]:
                break
            if not ops and perm == [0, 3, 1, 2]:
                nhwc = True
            axis = perm.index(axis)
        elif op in _AFFINE_OPS:
            if len(node.input) != 2:
                break
            if node.input[0] == cur and node.input[1] in consts:
                other = node.input[1]
            elif op in ("Add", "Mul") and node.input[1] == cur and node.input[0] in consts:
                other = node.input[0]
            else:
                break
            c = _per_channel(consts[other], axis)
            if c is None:
                break
            c = c[np.argsort(order)]  # per graph channel -> per fed channel
            if op == "Sub":
                offset = offset - c
            elif op == "Add":
                offset = offset + c
            elif op == "Mul":
                scale, offset = scale * c, offset * c
            elif np.all(c != 0):
                scale, offset = scale / c, offset / c
            else:
                break
        elif op == "Gather":
            indices = consts.get(node.input[1]) if len(node.input) == 2 else None
            gaxis = _attr(node, "axis", 0) % 4
            if node.input[0] != cur or indices is None or gaxis != axis:
                break
            perm = np.asarray(indices).reshape(-1) % 3
            if sorted(perm.tolist()) != [0, 1, 2]:
                break
            order = order[perm]
        elif op == "Split":
            saxis = _attr(node, "axis", 0) % 4
            outs = list(node.output)
            joins = {id(n): n for o in outs for n in consumers.get(o, [])}
            if saxis != axis or len(outs) != 3 or len(joins) != 1:
                break
            join = next(iter(joins.values()))
            if join.op_type != "Concat" or _attr(join, "axis", 0) % 4 != axis:
                break
            if sorted(join.input) != sorted(outs) or len(join.input) != 3:
                break
            order = order[[outs.index(i) for i in join.input]]
            ops.append(op)
            node = join
            op = "Concat"
        else:
            break
        ops.append(op)
        cur = node.output[0]
    return GraphInput(
        scale=tuple(float(v) for v in scale),  # type: ignore[arg-type]
        offset=tuple(float(v) for v in offset),  # type: ignore[arg-type]
        order=tuple(int(v) for v in order),  # type: ignore[arg-type]
        nhwc=nhwc,
        ops=tuple(ops),
    )


def load_graph(path: str) -> Any:
    """The model's ``onnx`` proto (weights left outside); a :class:`ModelError` if
    unreadable."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from None


def normalises_in_graph(path: str) -> bool:
    """Whether the graph normalises raw pixels itself (:attr:`GraphInput.normalises`,
    read from the ops that consume its input, whatever their names)."""
    proto = load_graph(path)
    inputs = [i.name for i in proto.graph.input if i.name not in _constants(proto.graph)]
    return bool(inputs) and read_graph_input(proto, inputs[0]).normalises


def _input_hw(
    path: str, name: str, shape: list[Any], size: int | None, declared: list[Any] | None = None
) -> tuple[int, int]:
    """``(H, W)`` of a ``(batch, 3, H, W)`` input; symbolic sides take ``size`` (or 112).
    ``declared``: the shape as the graph declares it (NHWC), for messages.

    Sides are capped at :data:`MAX_INPUT_SIDE`: a larger side in the graph is a
    :class:`~eval.errors.ModelError`, a larger ``--input-size`` an
    :class:`~eval.errors.EvalUsageError` (both name the model and its input shape)."""
    shown = declared if declared is not None else shape
    channels_ok = len(shape) == 4 and (not isinstance(shape[1], int) or shape[1] == 3)
    sides = shape[2:] if len(shape) == 4 else []
    if not channels_ok or any(isinstance(s, int) and s < 1 for s in sides):
        raise ModelError(
            f"{path}: input {name!r} has shape {shown}; expected (batch, 3, H, W) "
            "(NCHW with 3 colour channels)"
        )
    fixed = [s for s in sides if isinstance(s, int)]
    if any(s > MAX_INPUT_SIDE for s in fixed):
        raise ModelError(
            f"{path}: input {name!r} has shape {shown}: sides over {MAX_INPUT_SIDE} pixels "
            "are refused (evaluation feeds aligned face crops; re-export the model with a "
            "smaller input)"
        )
    if size is not None and not 1 <= size <= MAX_INPUT_SIDE:
        raise EvalUsageError(
            f"--input-size {size}: must be 1 to {MAX_INPUT_SIDE} pixels (model {path}, "
            f"input {name!r} of shape {shown})"
        )
    if size is not None and fixed and any(s != size for s in fixed):
        raise EvalUsageError(
            f"--input-size {size} contradicts the input {name!r} of {path}: shape {shown}"
        )
    fallback = size if size is not None else DEFAULT_SIZE
    h, w = (s if isinstance(s, int) else fallback for s in sides)
    return h, w


def _metadata_float(path: str, meta: dict[str, str], key: str, default: float) -> float:
    try:
        return float(meta.get(key, default))
    except ValueError:
        raise ModelError(f"{path}: metadata {key}={meta[key]!r} is not a number") from None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), shared evenly among the
    local ranks of a torchrun job (``LOCAL_WORLD_SIZE``); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, cores // ranks)


class OnnxEmbedder:
    """An onnxruntime session usable wherever an :data:`~eval.extract.Embedder` is.

    Args:
        path: the ``.onnx`` file.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (falls back to CPU without the
            CUDA provider).
        intra_op_threads: onnxruntime intra-op threads; None: one per usable core
            (:func:`usable_cores`), 0: onnxruntime's own default.
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
        intra_op_threads: int | None = None,
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
        #: onnxruntime's intra-op threads (0: its own default)
        self.threads = usable_cores() if intra_op_threads is None else int(intra_op_threads)
        if self.threads:
            opts.intra_op_num_threads = self.threads
        try:
            self.session = ort.InferenceSession(self.path, opts, providers=_providers(device))
        except _ort_errors() as exc:
            raise ModelError(
                f"{self.path}: onnxruntime cannot load this model: {_ort_reason(exc, self.path)}"
            ) from None
        #: whether the session runs on the CPU (its first provider)
        self.on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
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
        #: what the graph's leading ops do to the input (read from its structure)
        self.graph_input = read_graph_input(load_graph(self.path), self.input_name, len(shape))
        #: ``"NCHW"``, or ``"NHWC"`` for a ``(batch, H, W, 3)`` input the graph transposes
        self.layout = "NHWC" if self.graph_input.nhwc and shape[-1] == 3 else "NCHW"
        nchw = [shape[0], shape[3], shape[1], shape[2]] if self.layout == "NHWC" else shape
        self.input_hw = _input_hw(self.path, self.input_name, nchw, input_size, shape)
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
        self._settle(input_mean, input_std, input_color)

    def _settle(
        self, input_mean: float | None, input_std: float | None, input_color: str | None
    ) -> None:
        """Mean, std and colour, each from the option, else the metadata, else the graph's
        leading ops, else the default; :attr:`sources` says which."""
        meta, graph = self.metadata, self.graph_input
        if "input_mean" in meta or "input_std" in meta:
            mean = _metadata_float(self.path, meta, "input_mean", DEFAULT_MEAN)
            std = _metadata_float(self.path, meta, "input_std", DEFAULT_STD)
            norm_source = "metadata"
        elif graph.normalises:
            mean, std = 0.0, 1.0  # the graph normalises raw pixels itself
            norm_source = f"graph constants ({graph.describe()}: raw 0..255 pixels go in)"
        else:
            mean, std, norm_source = DEFAULT_MEAN, DEFAULT_STD, "default"
        if input_mean is not None or input_std is not None:
            norm_source = (
                "option" if None not in (input_mean, input_std) else "option + " + norm_source
            )
        self.mean = mean if input_mean is None else float(input_mean)
        self.std = std if input_std is None else float(input_std)
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise EvalUsageError(
                f"{self.path}: input std must be > 0 and both finite (mean {self.mean}, "
                f"std {self.std}; --input-mean/--input-std or the model's metadata)"
            )
        if input_color is not None:
            color, color_source = input_color, "option"
        elif "input_color" in meta:
            color, color_source = meta["input_color"], "metadata"
        elif graph.swaps_channels:
            color = "RGB" if DEFAULT_COLOR == "BGR" else "BGR"
            color_source = "graph (its first ops reverse the channels)"
        else:
            color, color_source = DEFAULT_COLOR, "default"
        self.color = color.upper()
        if self.color not in ("RGB", "BGR"):
            raise ModelError(
                f"{self.path}: metadata input_color must be RGB or BGR, got {self.color!r}"
            )
        #: where each part of the input convention came from: ``"option"``,
        #: ``"metadata"``, ``"graph ..."`` (its constants or ops) or ``"default"``
        self.sources = {"normalisation": norm_source, "color": color_source}

    def convention(self) -> dict[str, Any]:
        """The input convention chosen, and where each part came from (JSON-ready)."""
        h, w = self.input_hw
        return {
            "mean": self.mean,
            "std": self.std,
            "color": self.color,
            "layout": self.layout,
            "size": [h, w],
            "fixed_batch": self.fixed_batch,
            "sources": dict(self.sources),
        }

    @property
    def name(self) -> str:
        """The model's name in messages: its file."""
        return self.path

    def describe(self) -> str:
        """One line: how inputs are fed to this model."""
        h, w = self.input_hw
        batch = f", fixed batch {self.fixed_batch}" if self.fixed_batch is not None else ""
        layout = ", NHWC" if self.layout == "NHWC" else ""
        return (
            f"{self.path}: input {self.input_name} {self.color} {h}x{w}{layout}, "
            f"(pixel - {self.mean:g}) / {self.std:g}{batch}; normalisation from "
            f"{self.sources['normalisation']}, colour from {self.sources['color']}"
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw model output, unchecked: float ``(B, 3, H, W)`` input already in the model's
        normalisation, channel order and size -> ``(B, D)``. A fixed-batch model runs in
        chunks of its batch size, the last one padded by repeating its last row."""
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
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
