"""A distillation teacher: a frozen backbone read from a weight file, run in inference
mode on the student's device under the student's autocast, its input converted on the
device from the student's convention to its own; and the cache of its embeddings of a
whole training set (:func:`write_teacher_cache`, for ``python -m tools.teacher_embed``).

The losses it feeds are :mod:`partial_fc.distill`'s; ``distill.teacher`` builds it
(:func:`trainer.build.build_distillation`) and the step calls it through
:class:`trainer.distillation.Distillation` (see docs/training.md, "Distillation").
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from backbones.registry import get_model, input_spec
from backbones.weights import infer_model_kwargs, load_backbone_state, read_backbone_weights
from common.errors import UserError
from common.face_input import InputSpec
from datasets.dataset import FaceDataset
from datasets.loader import collate_uint8
from datasets.teacher_cache import SHARD_ROWS, shard_ranges, write_shard
from datasets.transforms import normalize_batch
from eval.onnx_infer import OnnxEmbedder


class TeacherError(UserError, ValueError):
    """A teacher file that does not fit what it is used for (the message names it)."""


def convert_input(images: torch.Tensor, source: InputSpec, target: InputSpec) -> torch.Tensor:
    """``(B, 3, s, s)`` images in ``source``'s convention as ``target`` reads them, on
    their device: back to pixels, channel order swapped if the colours differ, resized
    (bilinear, antialiased) if the sides differ, normalised by ``target``'s mean/std.
    The identity (the same tensor) when the conventions are equal."""
    if source == target:
        return images
    pixels = images * source.std + source.mean
    if source.color != target.color:
        pixels = pixels.flip(1)
    if source.size != target.size:
        pixels = F.interpolate(
            pixels, size=(target.size, target.size), mode="bilinear", antialias=True
        )
    return (pixels - target.mean) / target.std


class OnnxForward:
    """An ONNX model as a teacher's forward: float ``(B, 3, s, s)`` images already in
    the model's convention -> float32 ``(B, D)`` on the images' device.

    On a CUDA device with onnxruntime's CUDA provider, input and output stay on the GPU:
    onnxruntime reads the images' memory and writes into a torch tensor through I/O
    binding on their device pointers, with no host copy; torch's stream is synchronised
    before each run, since onnxruntime computes on a stream of its own. Otherwise the batch goes
    through the CPU session (a host copy each way).

    Args:
        embedder: the session (:class:`eval.onnx_infer.OnnxEmbedder`).
        device: the student's device.
        dim: the model's embedding size ``D`` (probed once on loading).
    """

    def __init__(self, embedder: OnnxEmbedder, device: torch.device, dim: int) -> None:
        self.embedder = embedder
        self.dim = dim
        self.on_gpu = device.type == "cuda" and not embedder.on_cpu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if not self.on_gpu:
            return torch.from_numpy(self.embedder.run(x.cpu().numpy())).to(x.device)
        step = self.embedder.fixed_batch or x.shape[0]
        outs = [self._bound(x[i : i + step], step) for i in range(0, x.shape[0], step)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _bound(self, chunk: torch.Tensor, step: int) -> torch.Tensor:
        """One session run on device memory; a short chunk of a fixed-batch model is
        padded with its last row."""
        n = chunk.shape[0]
        if n < step:
            chunk = torch.cat([chunk, chunk[-1:].expand(step - n, *chunk.shape[1:])])
        chunk = chunk.contiguous()
        out = torch.empty(step, self.dim, device=chunk.device, dtype=torch.float32)
        index = chunk.device.index or 0
        session, binding = self.embedder.session, self.embedder.session.io_binding()
        binding.bind_input(
            self.embedder.input_name, "cuda", index, np.float32, list(chunk.shape),
            chunk.data_ptr(),
        )  # fmt: skip
        binding.bind_output(
            self.embedder.output_name, "cuda", index, np.float32, list(out.shape), out.data_ptr()
        )
        # onnxruntime runs on its own CUDA stream: the images must be written first
        # (a wait on the device, per teacher call; the session returns when done)
        torch.cuda.current_stream(chunk.device).synchronize()
        session.run_with_iobinding(binding)
        return out[:n]


class Teacher:
    """A frozen teacher (not an ``nn.Module``: nothing of it trains, is wrapped in DDP
    or checkpointed): a backbone, or an ONNX model (:class:`OnnxForward`).

    Args:
        model: the teacher backbone (put in eval mode with ``requires_grad`` off), or
            any callable from images in ``teacher_input``'s convention to embeddings.
        source: the weight file's name (for messages).
        student_input: the convention of the images :meth:`__call__` receives.
        teacher_input: the convention the teacher reads.
        autocast: a context factory for the forward (the student's autocast).
    """

    def __init__(
        self,
        model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
        source: str,
        student_input: InputSpec,
        teacher_input: InputSpec,
        autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        if isinstance(model, nn.Module):
            model = model.eval().requires_grad_(False)
        self.model = model
        self.source = source
        self.student_input, self.teacher_input = student_input, teacher_input
        self.autocast = autocast
        self.embedding_size = 0
        """Dimensions of the teacher's embeddings (set by :meth:`from_file`)."""
        self.device = torch.device("cpu")
        """Where the teacher runs (set by :meth:`from_file` and :meth:`from_onnx`)."""

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        network: str,
        student_input: InputSpec,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
        embedding_size: int | None = None,
    ) -> Teacher:
        """Build ``network`` with the file's embedding size, load ``path`` strictly
        (``backbones.weights``: ours or arcface_torch's), move it to ``device`` and
        probe one forward. ``student_input`` is the convention of the images it will be
        given (the student's ``input_spec``, or the loader's for a cache).

        Raises:
            FileNotFoundError: no file at ``path``.
            BackboneWeightsError: the file is not ``network``'s weights (another
                architecture or layout; the message names the file and the key).
            TeacherError: the file's embedding size differs from ``embedding_size``,
                or the network rejects its own input size (both name the file).
        """
        source = os.fspath(path)
        state = read_backbone_weights(path)
        kwargs = infer_model_kwargs(state)
        found = kwargs.get("embedding_size")
        if embedding_size is not None and found is not None and found != embedding_size:
            raise TeacherError(
                f"{source}: the teacher's embeddings have {found} dimensions, "
                f"expected {embedding_size}"
            )
        model = get_model(network, **kwargs)
        load_backbone_state(model, state, source)
        teacher = cls(model.to(device), source, student_input, input_spec(network), autocast)
        teacher.embedding_size = teacher._probe(device)
        teacher.device = device
        return teacher

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        network: str | None,
        student_input: InputSpec,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> Teacher:
        """:meth:`from_onnx` for a ``.onnx`` file (which carries its network:
        ``network`` must be empty), else :meth:`from_file` with ``network``."""
        if os.fspath(path).lower().endswith(".onnx"):
            if network:
                raise TeacherError(
                    f"{os.fspath(path)}: an ONNX teacher carries its own network; do not "
                    f"name one (got {network!r})"
                )
            return cls.from_onnx(path, student_input, device)
        if not network:
            raise TeacherError(f"{os.fspath(path)}: a weight file needs its network's name")
        return cls.from_file(path, network, student_input, device, autocast)

    @classmethod
    def from_onnx(
        cls,
        path: str | os.PathLike[str],
        student_input: InputSpec,
        device: torch.device,
        embedding_size: int | None = None,
    ) -> Teacher:
        """An ONNX model (any face model, read as ``eval`` reads it: its input
        convention from the metadata, the graph's constants, or the default) on
        onnxruntime's CUDA provider when ``device`` is CUDA, else its CPU one.

        Raises:
            ModelError: onnxruntime cannot load it, or its input is not one float
                ``(batch, 3, H, W)`` image batch (naming the file and the input).
            TeacherError: a non-square input, or an embedding size other than
                ``embedding_size`` (naming the file).
        """
        source = os.fspath(path)
        embedder = OnnxEmbedder(source, device=str(device))
        h, w = embedder.input_hw
        if h != w:
            raise TeacherError(f"{source}: the teacher's input is {h}x{w}; a square one is needed")
        spec = InputSpec(size=h, mean=embedder.mean, std=embedder.std, color=embedder.color)
        probe = embedder.run(np.zeros((embedder.fixed_batch or 2, 3, h, w), np.float32))
        dim = int(probe.shape[1])
        if embedding_size is not None and dim != embedding_size:
            raise TeacherError(
                f"{source}: the teacher's embeddings have {dim} dimensions, "
                f"expected {embedding_size}"
            )
        teacher = cls(OnnxForward(embedder, device, dim), source, student_input, spec)
        teacher.embedding_size = teacher._probe(device)
        teacher.device = device
        return teacher

    def _probe(self, device: torch.device) -> int:
        """One forward of a 2-image zero batch: the embedding size, or a
        :class:`TeacherError` naming the file if the network rejects its input."""
        size = self.student_input.size
        try:
            out = self(torch.zeros(2, 3, size, size, device=device))
        except RuntimeError as exc:
            raise TeacherError(
                f"{self.source}: the teacher does not take its input "
                f"({self.teacher_input.size}x{self.teacher_input.size}): "
                f"{str(exc).splitlines()[0]}"
            ) from exc
        if out.dim() != 2 or out.shape[0] != 2:
            raise TeacherError(
                f"{self.source}: the teacher returns {tuple(out.shape)}, not (batch, dim) "
                "embeddings"
            )
        return int(out.shape[1])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's ``(B, D)`` float32 embeddings of ``images`` (student
        convention), with no autograd history (an ordinary tensor, usable in the
        student's loss graph)."""
        with torch.inference_mode(), self.autocast():
            out = self.model(convert_input(images, self.student_input, self.teacher_input))
        # inference tensors cannot be saved for backward: copy out of inference mode
        return out.float().clone()


def write_teacher_cache(
    teacher: Teacher,
    dataset: FaceDataset,
    out: str | os.PathLike[str],
    *,
    flip: bool = False,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    shard_rows: int = SHARD_ROWS,
) -> int:
    """Run ``teacher`` over this rank's shards of ``dataset`` (shards ``rank``,
    ``rank + world_size``, ... of :func:`~datasets.teacher_cache.shard_ranges`) in
    record order, with the dataset's decode (no random flip, no augmentation), and write
    them into ``out`` (an existing directory the caller owns). The caller writes the
    manifest (:func:`~datasets.teacher_cache.write_manifest`) once every rank is done.
    Returns the number of records this rank embedded.

    Args:
        flip: store the mean of the embeddings of each image and its mirror image.
        rank, world_size: this process's share of the shards.
    """
    data = copy.copy(dataset)
    data.flip, data.output, data.skip_corrupt = False, "uint8", False  # every record, as stored
    ranges = shard_ranges(len(dataset), shard_rows)
    mine = list(range(rank, len(ranges), world_size))
    done = 0
    bar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in mine), disable=not progress)
    for k in mine:
        lo, hi = ranges[k]
        loader = DataLoader(
            Subset(data, range(lo, hi)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_uint8,
            pin_memory=teacher.device.type == "cuda",
        )
        rows = []
        for images, _ in loader:
            x = normalize_batch(images.to(teacher.device, non_blocking=True))
            emb = teacher(x)
            if flip:
                emb = (emb + teacher(x.flip(3))) / 2
            rows.append(emb.cpu().numpy())
            bar.update(len(images))
        block = np.concatenate(rows) if rows else np.zeros((0, teacher.embedding_size), np.float32)
        write_shard(out, k, lo, block)
        done += hi - lo
    bar.close()
    return done
