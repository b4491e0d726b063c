"""An online distillation teacher: a frozen backbone read from a weight file, run in
inference mode on the student's device under the student's autocast, its input
converted on the device from the student's convention to its own.

The losses it feeds are :mod:`partial_fc.distill`'s; ``distill.teacher`` builds it
(:func:`trainer.build.build_distillation`) and the step calls it through
:class:`trainer.distillation.Distillation` (see docs/training.md, "Distillation").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from backbones import get_model, input_spec, read_backbone_weights
from backbones.weights import infer_model_kwargs, load_backbone_state
from common.errors import UserError
from common.face_input import InputSpec


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


class Teacher:
    """A frozen teacher backbone (not an ``nn.Module``: nothing of it trains, is
    wrapped in DDP or checkpointed).

    Args:
        model: the teacher backbone; put in eval mode with ``requires_grad`` off.
        source: the weight file's name (for messages).
        student_input: the convention of the images :meth:`__call__` receives.
        teacher_input: the convention the teacher reads.
        autocast: a context factory for the forward (the student's autocast).
    """

    def __init__(
        self,
        model: nn.Module,
        source: str,
        student_input: InputSpec,
        teacher_input: InputSpec,
        autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.student_input, self.teacher_input = student_input, teacher_input
        self.autocast = autocast
        self.embedding_size = 0
        """Dimensions of the teacher's embeddings (set by :meth:`from_file`)."""

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        network: str,
        student_network: str,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
        embedding_size: int | None = None,
    ) -> Teacher:
        """Build ``network`` with the file's embedding size, load ``path`` strictly
        (``backbones.weights``: ours or arcface_torch's), move it to ``device`` and
        probe one forward.

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
        teacher = cls(
            model.to(device), source, input_spec(student_network), input_spec(network), autocast
        )
        teacher.embedding_size = teacher._probe(device)
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
