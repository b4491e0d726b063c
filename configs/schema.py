"""Typed training configuration: one dataclass per concern, validated as a whole.

Every field carries a docstring (the string literal under it); ``configs.describe``
prints them. Values are only ever *set* here or by overrides; quantities derived
from them (total steps, warm-up steps, per-rank class ranges) are computed by the
trainer and never written back into the configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_type_hints

from common.errors import UsageError
from configs.checks import OneOf, Range, field_problem
from configs.resume_policy import MAY_CHANGE, refuse
from partial_fc import backend as head_backend
from partial_fc.head import check_head_options
from partial_fc.registry import check_margin_options, margin_names
from partial_fc.sampling import parse_rate_schedule


class ConfigError(UsageError, ValueError):
    """A configuration key or value is invalid; the message names the option (exit
    code 2, as for a bad command-line option)."""


def _check(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message} (got {value!r})")


def _finite(value: Any) -> bool:
    """``value`` is a real number that is neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


class Section:
    """A configuration section. :meth:`validate` checks every field against what its type
    declares (``Literal`` choices, :class:`~configs.checks.Range`,
    :class:`~configs.checks.OneOf`), then the rules that involve several fields, files
    or components (:meth:`check_rules`)."""

    prefix: ClassVar[str]
    """The section's key, as options name it (``head``)."""

    def validate(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            problem = field_problem(getattr(self, f.name), hints[f.name])
            if problem is not None:
                raise ConfigError(f"{self.prefix}.{f.name}: {problem}")
        self.check_rules()

    def check_rules(self) -> None:
        """The section's checks beyond each field's declared values (none by default)."""


#: Upper bounds that keep derived quantities in range (see each check's message).
MAX_EPOCHS = 100_000
MAX_SEED = 2**32
MAX_TIMEOUT_S = 7 * 24 * 3600.0

Probability = Annotated[float, Range(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Range(ge=0.0, finite=True)]
PositiveFinite = Annotated[float, Range(gt=0.0, finite=True)]


@dataclass
class ModelConfig(Section):
    """The backbone network."""

    prefix: ClassVar[str] = "model"
    network: str = "r50"
    """Backbone name passed to ``backbones.get_model`` (e.g. ``r50``, ``r100``, ``mbf``)."""
    embedding_size: Annotated[int, Range(gt=0)] = 512
    """Dimension of the face embedding produced by the backbone."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``backbones.get_model`` (e.g. ``model.kwargs.dropout=0.1``)."""
    init_from: str = field(default="", metadata=MAY_CHANGE)
    """Backbone weights a new run starts from (fine-tuning): a ``backbone.pt``/``.pth``
    (this project's or arcface_torch's, DDP ``module.`` prefixes stripped) or a
    ``.safetensors`` file; loaded strictly before step 0, the head starts afresh. Ignored
    when the run resumes from a checkpoint (the checkpoint's weights win). Empty: random
    initialisation."""
    freeze_stem: bool = field(
        default=False, metadata=refuse("the backbone optimizer's parameters are the checkpoint's")
    )
    """Freeze the stem (the layers before the first residual unit: conv/BN/PReLU of the
    ResNets and MobileFaceNets, the patch and position embeddings and mask token of the
    ViTs; the network's group matcher, ``backbones.registry.group_matcher``): no
    gradient, not in the optimizer, its BatchNorm statistics fixed."""
    freeze_units: Annotated[
        int, Range(ge=0, why="(the number of leading residual units to freeze)")
    ] = field(
        default=0, metadata=refuse("the backbone optimizer's parameters are the checkpoint's")
    )
    """Freeze the first N residual units (blocks) in forward order, and the stem with
    them (a unit after a trained stem would see moving inputs); 0: none. Checked against
    the network's unit count at start-up."""
    freeze_bn_stats: bool = field(default=False, metadata=MAY_CHANGE)
    """Keep every BatchNorm layer of the backbone in eval mode while training: it
    normalises with, and never updates, its running statistics (the pretrained ones);
    its affine weight and bias still train unless frozen."""

    def check_rules(self) -> None:
        _check(bool(self.network), "model.network", "must be a non-empty name", self.network)
        _check(
            isinstance(self.init_from, str),
            "model.init_from",
            "must be a path to backbone weights, or empty",
            self.init_from,
        )


#: PartialFC's arguments -> the head options that set them.
_HEAD_ARGUMENTS = {
    "num_subcenters": "head.num_subcenters",
    "sample_rate": "head.sample_rate",
    "chunk_classes": "head.chunk_size",
    "interclass_filtering_threshold": "head.interclass_filtering_threshold",
    "interclass_filtering_mode": "head.interclass_filtering_mode",
}


@dataclass
class HeadConfig(Section):
    """The Partial-FC classification head and its margin. The head
    (:func:`partial_fc.check_head_options`) and the margin classes check their own
    options; :meth:`validate` runs those checks at start-up, naming the options."""

    prefix: ClassVar[str] = "head"
    loss: Annotated[str, OneOf(margin_names)] = "arcface"
    """Margin type, a name of the margin registry (:mod:`partial_fc.registry`): additive
    angular (arcface), additive cosine (cosface), multiplicative angular (sphereface), the
    combined ``cos(m1*t + m2) - m3``, or a batch-aware margin: adaface, magface,
    curricular, elastic (docs/partial_fc.md)."""
    scale: float = 64.0
    """Logit scale ``s`` applied to the cosines; positive and finite."""
    margin: float = 0.5
    """Margin of arcface, adaface, curricular and elastic (radians, in [0, pi); for
    elastic the mean of the drawn margins), cosface (cosine, in [0, 2)) or sphereface
    (angle multiplier, >= 1); ignored by ``combined`` and ``magface``."""
    m1: float = 1.0
    """Combined margin: multiplicative angular margin, >= 1 (used only by ``loss=combined``)."""
    m2: float = 0.0
    """Combined margin: additive angular margin in radians, in [0, pi) (used only by
    ``loss=combined``)."""
    m3: float = 0.0
    """Combined margin: additive cosine margin, in [0, 2) (used only by ``loss=combined``)."""
    sample_rate: float = field(default=1.0, metadata=MAY_CHANGE)
    """Fraction of negative class centres sampled per step (Partial FC), in (0, 1];
    1.0 = full softmax. With ``sample_rate_schedule``: the rate before its first
    breakpoint."""
    sample_rate_schedule: str = field(default="", metadata=MAY_CHANGE)
    """The sampling rate over the run: comma-separated ``RATE@STEP`` breakpoints (the
    rate from that optimizer step on, steps increasing, rates in (0, 1]), and between two
    of them optionally ``ramp:N``, a linear ramp quantised into N equal phases; at most
    32 phases. ``1.0@9000``: ``sample_rate`` then the full softmax from step 9000
    (LVFace); ``0.1@0,ramp:4,1.0@8000``: a ramp. Empty: ``sample_rate`` throughout
    (docs/training.md, "Sampling schedules")."""
    num_subcenters: int = field(default=1, metadata=refuse("the head's rows are the checkpoint's"))
    """Sub-centres per class (sub-center ArcFace), >= 1; 1 disables them."""
    chunk_size: int | None = field(default=None, metadata=MAY_CHANGE)
    """Classes per logits block of the head (> 0); ``None``: the head's automatic choice
    (a block of at most half the size of the weight shard's gradient)."""
    easy_margin: bool = False
    """Apply the angular margin only where ``cos(theta) > 0`` (ArcFace paper option)."""
    straight_through: bool = False
    """Use ``arcface_torch``'s straight-through margin gradient instead of the exact one."""
    margins_file: str = ""
    """Per-class margins: a ``.txt`` file with one value per class (replaces ``margin``,
    or ``m2`` for ``combined``; each value in that margin's range, checked at start-up);
    empty: the same margin for every class."""
    sphereface_annealing: bool = False
    """SphereFace only: A-Softmax's lambda annealing (1000 decaying to 5)."""
    interclass_filtering_threshold: float | None = field(default=None, metadata=MAY_CHANGE)
    """Negatives whose cosine to a sample exceeds this are label conflicts; null: off."""
    interclass_filtering_mode: Literal["remove", "zero"] = field(
        default="remove", metadata=MAY_CHANGE
    )
    """``remove``: drop conflicts from the softmax denominator; ``zero``: the reference
    implementation's behaviour (cosine set to 0, still counted)."""
    matmul_dtype: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata=MAY_CHANGE)
    """Precision of the head's matrix products (bf16/fp16: tensor cores on GPU,
    fp32 accumulation and fp32 softmax statistics)."""
    backend: Literal["auto", "torch", "triton"] = field(default="auto", metadata=MAY_CHANGE)
    """Code of the head's non-target logits: ``torch`` (chunked blocks; every option, any
    device), ``triton`` (fused kernels that never write a logits block: CUDA,
    ``num_subcenters`` 1, no inter-class filtering, no ``curricular``; needs the triton
    package, checked at start-up), or ``auto``: triton where it applies and the products
    are bf16/fp16 (``matmul_dtype``), torch elsewhere (docs/partial_fc.md, "Triton
    kernels")."""
    adaface_h: float = 0.333
    """AdaFace: gain from the normalised feature norm to the margin scaler (> 0)."""
    ema_alpha: float = 0.01
    """AdaFace and CurricularFace: weight of the current batch in their EMAs, (0, 1]."""
    magface_l_a: float = 10.0
    """MagFace: lower magnitude bound l_a (> 0)."""
    magface_u_a: float = 110.0
    """MagFace: upper magnitude bound u_a (> l_a)."""
    magface_l_m: float = 0.45
    """MagFace: margin at l_a (radians)."""
    magface_u_m: float = 0.8
    """MagFace: margin at u_a (radians, >= l_m, < pi)."""
    magface_lambda_g: float = 35.0
    """MagFace: weight of the magnitude regulariser (>= 0)."""
    elastic_std: float = 0.0125
    """ElasticFace: standard deviation of the per-sample margins (>= 0)."""
    elastic_kind: Literal["arc", "cos"] = "arc"
    """ElasticFace: apply the drawn margin as ArcFace (arc) or CosFace (cos) does."""
    elastic_plus: bool = False
    """ElasticFace+: the largest target cosine gets the smallest drawn margin."""
    init: Literal["random", "imprint"] = field(default="random", metadata=MAY_CHANGE)
    """Initial class centres of a new run: ``random`` (N(0, 0.01^2), seeded by
    ``train.seed``) or ``imprint``: each centre points along the mean of its training
    images' L2-normalised embeddings under the initial backbone (``model.init_from``;
    the row keeps its random norm, which only sets its step size), computed in one
    rank-parallel pass before step 0; with sub-centres, sub-centre 0 is that mean and
    the others are nudged off it (docs/training.md, "Fine-tuning"). Classes without
    images keep the random centre. Not applied on resume."""

    def check_rules(self) -> None:
        try:
            check_margin_options(
                self.loss, vars(self), per_class=self.margins_file or None, prefix="head."
            )
            check_head_options(
                num_subcenters=self.num_subcenters,
                sample_rate=self.sample_rate,
                chunk_classes=self.chunk_size,
                interclass_filtering_threshold=self.interclass_filtering_threshold,
                interclass_filtering_mode=self.interclass_filtering_mode,
                names=_HEAD_ARGUMENTS,
            )
            parse_rate_schedule(
                self.sample_rate_schedule, self.sample_rate, name="head.sample_rate_schedule"
            )
        except OSError as exc:
            raise ConfigError(
                f"head.margins_file: cannot read {self.margins_file!r} ({exc.strerror or exc})"
            ) from None
        except ValueError as exc:  # the message names the option and says why
            raise ConfigError(str(exc)) from None
        if self.backend == "triton":
            why = head_backend.triton_missing() or head_backend.triton_unsupported(
                num_subcenters=self.num_subcenters,
                filtering=self.interclass_filtering_threshold is not None,
                loss=self.loss,
            )
            if why:
                raise ConfigError(f"head.backend=triton: {why}; 'auto' runs such a head on torch")


def _dataset_place(root: str) -> str:
    """Where ``data.root`` entry ``root`` leads: its real path (symlinks, ``..`` and the
    working directory resolved), a ``train.rec`` file standing for its directory. Equal
    places are one dataset; the data files' device and inode are compared again when the
    datasets are opened (:func:`datasets.multi.open_datasets`), which also catches hard
    links."""
    place = os.path.realpath(root)
    if os.path.basename(place) == "train.rec":
        place = os.path.dirname(place)
    return place


@dataclass
class DataConfig(Section):
    """Training data and its loader."""

    prefix: ClassVar[str] = "data"
    root: str | list[str] = field(default="", metadata=MAY_CHANGE)
    """Training data: a directory holding ``train.rec``, ``train.idx``, ``property`` (and the
    ``.bin`` targets), a ``.rec`` file, a directory of Arrow shards or an image folder; or a
    list of them (``data.root=[/data/a,/data/b]``), kinds mixed, trained as one dataset whose
    label spaces are concatenated in list order (docs/data.md, "Several datasets")."""
    num_classes: Annotated[int, Range(gt=0)] = field(
        default=0, metadata=refuse("the head's rows are the checkpoint's")
    )
    """Number of identities (with several ``data.root``, their sum); checked against the
    data."""
    num_images: Annotated[int, Range(gt=0)] = field(
        default=0, metadata=refuse("the sampler's position is an index into the checkpoint's data")
    )
    """Number of training images (with several ``data.root``, their sum); checked against
    the data."""
    weights: list[float] = field(
        default_factory=list,
        metadata=refuse(
            "the epoch's sample order is drawn from them (the sampler's position indexes it)"
        ),
    )
    """Per-dataset sampling weights, one per ``data.root`` entry, each > 0: an epoch stays
    ``data.num_images`` samples, of which dataset i gives the share w_i / sum(w) (rounded
    by largest remainder; its images repeated or subsampled, seeded). Empty: every image
    once per epoch."""
    batch_size: Annotated[int, Range(gt=0)] = field(default=128, metadata=MAY_CHANGE)
    """Per-rank micro-batch size (the global batch is ``batch_size * world_size``)."""
    num_workers: Annotated[int, Range(ge=0)] = field(default=2, metadata=MAY_CHANGE)
    """DataLoader worker processes per rank (0 loads in the training process)."""
    random_flip: bool = field(default=True, metadata=MAY_CHANGE)
    """Horizontal-flip augmentation during training."""
    sampler: Literal["random", "pk"] = field(
        default="random", metadata=refuse("the sampler's position is the checkpoint's sampler's")
    )
    """``random``: a seeded shuffle of all images; ``pk``: every rank's batch holds
    ``batch_size / data.pk_images_per_identity`` identities with that many images each
    (distinct identities across ranks), so triplet mining always finds positives."""
    pk_images_per_identity: Annotated[int, Range(ge=1)] = field(
        default=4, metadata=refuse("the sampler's position is the checkpoint's sampler's")
    )
    """K of the P x K sampler (``data.sampler=pk``); must divide ``data.batch_size``."""
    pk_small_identity: Literal["replace", "drop"] = field(
        default="replace", metadata=refuse("the sampler's position is the checkpoint's sampler's")
    )
    """P x K sampler: identities with fewer than K images are topped up with their own
    images (``replace``) or skipped (``drop``)."""
    skip_corrupt: bool = field(default=False, metadata=MAY_CHANGE)
    """Skip corrupt samples (undecodable image, malformed record, bad ``.idx`` offset):
    each is logged with its file, key and offset, counted, and replaced by the next
    sample. Labels outside ``[0, num_classes)`` or not integers are never skipped.
    false: the first corrupt sample stops the run (``DataError``)."""
    max_skipped_fraction: Annotated[
        float,
        Range(
            ge=0.0,
            lt=1.0,
            what="a fraction",
            why="the share of the training images that may be skipped as corrupt (1 or more "
            "would let a run train on no data at all)",
        ),
    ] = field(default=0.001, metadata=MAY_CHANGE)
    """With ``data.skip_corrupt``: the run stops (``DataError``) once a rank's loader (its
    workers share the count) has skipped more distinct samples than this fraction of
    ``data.num_images``; in [0, 1)."""

    def roots(self) -> list[str]:
        """``data.root`` as a list (one entry for a single dataset)."""
        return list(self.root) if isinstance(self.root, list | tuple) else [self.root]

    def check_rules(self) -> None:
        roots = self.roots()
        _check(
            bool(roots) and all(isinstance(r, str) and r.strip() for r in roots),
            "data.root",
            "must name the dataset directory, or a non-empty list of them, none empty",
            self.root,
        )
        same = [_dataset_place(r) for r in roots]
        for i, root in enumerate(same):
            first = same.index(root)
            _check(
                first == i,
                f"data.root[{i}]",
                f"repeats data.root[{first}] ({roots[first]!r}, the same dataset: its "
                "identities would count twice, as other classes)",
                roots[i],
            )
        if self.weights:
            _check(
                len(self.weights) == len(roots),
                "data.weights",
                f"needs one weight per data.root entry ({len(roots)})",
                self.weights,
            )
            _check(
                all(_finite(w) and w > 0 for w in self.weights),
                "data.weights",
                "must be finite and > 0",
                self.weights,
            )
            _check(
                self.sampler == "random",
                "data.weights",
                "work with data.sampler=random only (the P x K sampler draws by identity)",
                self.weights,
            )
        if self.sampler == "pk":
            _check(
                self.batch_size % self.pk_images_per_identity == 0,
                "data.pk_images_per_identity",
                f"must divide data.batch_size={self.batch_size}",
                self.pk_images_per_identity,
            )


@dataclass
class AugmentConfig(Section):
    """Training augmentations applied to each batch on the device (``datasets/augment.py``),
    after the loader's flip; each stage is drawn per sample with its own probability. AdaFace
    trains with ``crop_prob = lowres_prob = photometric_prob = 0.2`` and no erasing."""

    prefix: ClassVar[str] = "augment"
    crop_prob: Probability = 0.0
    """Probability of AdaFace's crop: a RandomResizedCrop rectangle kept in place, black
    around it (AdaFace: 0.2)."""
    crop_min_scale: Annotated[float, Range(gt=0.0, le=1.0)] = 0.2
    """Smallest kept area as a fraction of the image (the largest is 1), in (0, 1]."""
    lowres_prob: Probability = 0.0
    """Probability of down-sampling to a random side and back up, each with a random OpenCV
    interpolation (AdaFace: 0.2)."""
    lowres_min_side: Annotated[float, Range(ge=0.2, le=1.0)] = 0.2
    """Smallest low-resolution side as a fraction of the image side (the largest is 1), in
    [0.2, 1]."""
    photometric_prob: Probability = 0.0
    """Probability of ColorJitter: brightness, contrast and saturation in a random order
    (AdaFace: 0.2)."""
    brightness: Probability = 0.5
    """ColorJitter brightness strength s: factor ~ U(1 - s, 1 + s), s in [0, 1]."""
    contrast: Probability = 0.5
    """ColorJitter contrast strength s: factor ~ U(1 - s, 1 + s), s in [0, 1]."""
    saturation: Probability = 0.5
    """ColorJitter saturation strength s: factor ~ U(1 - s, 1 + s), s in [0, 1]."""
    erase_prob: Probability = 0.0
    """Probability of random erasing (torchvision's RandomErasing rectangle); AdaFace: 0."""
    erase_fill: Literal["noise", "constant"] = "noise"
    """Erased rectangle: uniform noise in [-1, 1] (``noise``) or ``augment.erase_value``."""
    erase_value: Annotated[float, Range(ge=-1.0, le=1.0)] = 0.0
    """Constant fill of ``erase_fill=constant``, in normalised units [-1, 1] (0 = mid grey)."""


@dataclass
class OptimizerConfig(Section):
    """Optimizer shared by the backbone (torch) and the head (row-sparse Partial-FC)."""

    prefix: ClassVar[str] = "optimizer"
    name: Literal["sgd", "adamw"] = field(
        default="sgd", metadata=refuse("the optimizer state is the checkpoint's optimizer's")
    )
    """``sgd`` (momentum, L2 weight decay) or ``adamw`` (decoupled weight decay)."""
    lr: Annotated[float, Range(gt=0.0, finite=True)] = field(default=0.1, metadata=MAY_CHANGE)
    """Peak learning rate, reached at the end of warm-up."""
    momentum: Annotated[
        float,
        Range(
            ge=0.0,
            lt=1.0,
            why="the velocity is multiplied by it every step, and 1 or more never forgets a "
            "gradient (it grows without bound)",
        ),
    ] = field(default=0.9, metadata=MAY_CHANGE)
    """SGD momentum (``sgd`` only)."""
    weight_decay: Annotated[float, Range(ge=0.0, finite=True)] = field(
        default=5e-4, metadata=MAY_CHANGE
    )
    """Weight decay for backbone and head."""
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=MAY_CHANGE)
    """AdamW moment decay rates (``adamw`` only)."""
    eps: Annotated[
        float,
        Range(gt=0.0, lt=1.0, why="it only guards Adam's division by the second moment"),
    ] = field(default=1e-8, metadata=MAY_CHANGE)
    """AdamW denominator epsilon (``adamw`` only)."""
    head_state_dtype: Literal["fp32", "bf16"] = field(default="fp32", metadata=MAY_CHANGE)
    """Storage of the head optimizer's momentum / Adam moments: ``bf16`` halves their
    memory (updates are still computed in fp32; see docs/partial_fc.md for the measured
    trade-off)."""
    backbone_lr_mult: Annotated[
        float,
        Range(
            gt=0.0,
            finite=True,
            why="(to keep backbone layers fixed, use model.freeze_stem / model.freeze_units)",
        ),
    ] = field(default=1.0, metadata=MAY_CHANGE)
    """The backbone's learning rate is ``optimizer.lr`` times this (> 0; the head's is
    ``optimizer.lr``); both follow the same schedule. Fine-tuning uses < 1."""
    weight_decay_exclude_norm_bias: bool = field(
        default=False,
        metadata=refuse("the backbone optimizer's parameter groups are the checkpoint's"),
    )
    """Exclude the backbone's normalisation, PReLU and bias parameters (every parameter
    with at most one dimension, or named ``*.bias``; timm's convention) from weight decay.
    false: decay on every parameter, as arcface_torch does."""

    def check_rules(self) -> None:
        _check(
            len(self.betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas),
            "optimizer.betas",
            "must be two values in [0, 1): Adam's moment averages and their bias "
            "correction 1 - beta**t divide by zero at 1",
            self.betas,
        )
        _check(
            self.lr * self.weight_decay < 1.0,
            "optimizer.weight_decay",
            f"times optimizer.lr={self.lr:g} must be < 1: every step scales the weights by "
            "(1 - lr * weight_decay), which is then zero or negative",
            self.weight_decay,
        )
        _check(
            self.lr * self.backbone_lr_mult * self.weight_decay < 1.0,
            "optimizer.backbone_lr_mult",
            f"times optimizer.lr={self.lr:g} times optimizer.weight_decay="
            f"{self.weight_decay:g} must be < 1: every step scales the backbone's weights by "
            "(1 - lr * mult * weight_decay), which is then zero or negative",
            self.backbone_lr_mult,
        )


@dataclass
class SchedulerConfig(Section):
    """Learning-rate schedule: linear warm-up, then polynomial decay to zero."""

    prefix: ClassVar[str] = "scheduler"
    warmup_epochs: Annotated[float, Range(ge=0.0, finite=True)] = 0.0
    """Length of the linear warm-up in epochs (converted to optimizer steps at start-up)."""
    warmup_start_factor: Annotated[float, Range(gt=0.0, le=1.0)] = 0.01
    """LR at step 0 as a fraction of ``optimizer.lr`` (small but non-zero)."""
    power: Annotated[
        float, Range(gt=0.0, finite=True, why="(the decay (1 - progress) ** power)")
    ] = 2.0
    """Exponent of the polynomial decay ``(1 - progress) ** power``."""


@dataclass
class TrainConfig(Section):
    """The optimisation loop."""

    prefix: ClassVar[str] = "train"
    epochs: Annotated[
        int,
        Range(
            ge=1,
            le=MAX_EPOCHS,
            why="(the schedule, step counters and ETA are derived from it)",
        ),
    ] = field(default=20, metadata=MAY_CHANGE)
    """Number of passes over the training set; fixes the schedule's length."""
    grad_accum: Annotated[int, Range(ge=1, le=65536, why="(micro-batches per optimizer step)")] = (
        field(default=1, metadata=MAY_CHANGE)
    )
    """Micro-batches accumulated per optimizer step (loss averaged over them)."""
    clip_grad_norm: Annotated[
        float | None, Range(gt=0.0, finite=True, why="(null disables clipping)")
    ] = field(default=5.0, metadata=MAY_CHANGE)
    """Max global L2 norm of backbone and head gradients together; ``null`` disables."""
    amp: Literal["bf16", "fp16", "none"] = field(default="bf16", metadata=MAY_CHANGE)
    """Backbone autocast dtype on CUDA (``fp16`` adds a grad scaler); ignored on CPU.
    The head always runs in fp32."""
    seed: Annotated[
        int,
        Range(
            ge=0,
            lt=MAX_SEED,
            text="in [0, 2**32)",
            why="the per-rank and loader seeds derived from it (seed + 1000003 * (rank + 1), "
            "seed * 7919 + rank) must stay within the 64-bit seeds torch accepts",
        ),
    ] = field(default=0, metadata=refuse("the data order and sampling streams are seeded by it"))
    """Seed for initialisation, sampling and data order."""
    max_steps: Annotated[int | None, Range(ge=1, le=2**40, text="in [1, 2**40]")] = field(
        default=None, metadata=MAY_CHANGE
    )
    """Stop after this optimizer step (the schedule still spans ``epochs``); ``null`` = end."""
    output: str = field(default="work_dirs/run", metadata=MAY_CHANGE)
    """Output directory: resolved config, logs, TensorBoard, checkpoints, exported weights.
    Owned by training (``.owner.json``): a non-empty directory that training did not make
    is refused, naming what it holds (see ``train.overwrite``); never the root directory."""
    overwrite: bool = field(default=False, metadata=MAY_CHANGE)
    """Write into a ``train.output`` that is not empty and was not made by training (a
    dataset, another command's output, ...); files the run does not write are kept. A
    directory of an earlier training run is always resumed into, without this."""
    max_bad_steps: Annotated[int, Range(ge=1)] = field(default=5, metadata=MAY_CHANGE)
    """Stop with an error after this many consecutive steps with a non-finite loss or
    gradient (each such step is skipped: no parameter update, its batch keys logged)."""
    collective_timeout_s: Annotated[
        float,
        Range(
            gt=0.0,
            le=MAX_TIMEOUT_S,
            finite=True,
            unit="seconds",
            why="(7 days): it is the process group's timeout, and an infinite one would let "
            "a hung peer block forever",
        ),
    ] = field(default=1800.0, metadata=MAY_CHANGE)
    """Seconds a collective may wait for its peers before the job fails naming the step
    (passed to ``init_process_group``); a hung or dead rank cannot block forever."""

    def check_rules(self) -> None:
        _check(
            isinstance(self.output, str) and bool(self.output.strip()),
            "train.output",
            "must be a directory path",
            self.output,
        )
        _check(
            os.path.realpath(self.output) != os.path.realpath(os.sep),
            "train.output",
            "is the root directory, which cannot be a run's output (give a directory of its "
            "own, e.g. work_dirs/run)",
            self.output,
        )


@dataclass
class CheckpointConfig(Section):
    """Periodic, atomic, resharding-capable checkpoints."""

    prefix: ClassVar[str] = "checkpoint"
    every_steps: Annotated[int, Range(ge=0)] = 2000
    """Save every this many optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: Annotated[int, Range(ge=1)] = 2
    """Number of most recent complete checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """``auto`` (latest complete checkpoint in the output dir, if any), ``none``,
    or the path of a checkpoint directory."""

    def check_rules(self) -> None:
        _check(bool(self.resume), "checkpoint.resume", "must be auto, none or a path", self.resume)


@dataclass
class EvalConfig(Section):
    """Periodic verification on ``.bin`` pair files."""

    prefix: ClassVar[str] = "eval"
    targets: list[str] = field(default_factory=lambda: ["lfw", "cfp_fp", "agedb_30"])
    """Names of ``<data.root>/<name>.bin`` files (or paths) to verify on."""
    every_steps: Annotated[int, Range(ge=0)] = 2000
    """Verify every this many optimizer steps (and at the end); 0 = only at the end."""
    at_start: bool = False
    """Also verify before the first step (shows the untrained baseline)."""
    batch_size: Annotated[int, Range(gt=0)] = 256
    """Per-rank batch size for embedding extraction."""

    def check_rules(self) -> None:
        names = [Path(t).stem for t in self.targets]
        _check(
            all(isinstance(t, str) and t.strip() for t in self.targets),
            "eval.targets",
            "must be names or paths of .bin files, none empty",
            self.targets,
        )
        _check(
            len(set(names)) == len(names),
            "eval.targets",
            "must have distinct names (results are reported by file name, so a second "
            "target of the same name would replace the first)",
            self.targets,
        )


#: The experiment trackers ``log.backends`` may name (``trainer.tracking``'s registry).
LOG_BACKENDS = ("tensorboard", "mlflow", "wandb")


@dataclass
class LogConfig(Section):
    """Rank-0 logging."""

    prefix: ClassVar[str] = "log"
    every_steps: Annotated[int, Range(gt=0)] = 50
    """Log a line (and TensorBoard scalars) every this many optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars under ``<train.output>/tensorboard`` when ``tensorboard``
    is in ``log.backends`` (false turns it off there: the switch of earlier versions)."""
    progress_bar: bool = True
    """Show a tqdm progress bar, only when stderr is a terminal."""
    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers rank 0 logs to, any subset of ``tensorboard``, ``mlflow``,
    ``wandb`` (``log.backends=[tensorboard,mlflow]``; ``[]``: none). Each gets the
    flattened config, the step metrics, the verification results and, at the end, the
    exported weights and model folder (docs/training.md, "Experiment tracking")."""
    mlflow_uri: str = ""
    """MLflow tracking URI (``file:/path``, ``sqlite:///path.db``, ``http://host:5000``);
    empty: ``file:<train.output>/mlruns``. A resumed run continues the same MLflow run."""
    experiment: str = ""
    """MLflow experiment and W&B project name; empty: the config's ``name``."""

    def active_backends(self) -> list[str]:
        """``backends`` without ``tensorboard`` when ``log.tensorboard`` is false."""
        return [b for b in self.backends if b != "tensorboard" or self.tensorboard]

    def check_rules(self) -> None:
        _check(
            isinstance(self.backends, list)
            and all(b in LOG_BACKENDS for b in self.backends)
            and len(set(self.backends)) == len(self.backends),
            "log.backends",
            f"must be a list of distinct names among {', '.join(LOG_BACKENDS)}",
            self.backends,
        )


@dataclass
class AuxLossConfig(Section):
    """Auxiliary losses added to the head loss (see ``docs/aux_losses.md``)."""

    prefix: ClassVar[str] = "aux"
    center_weight: NonNegative = 0.0
    """Weight of the sharded center loss in the total loss; 0 turns it off."""
    center_radius: NonNegative = 0.0
    """Center loss hinge radius ``r``: distances below it cost nothing."""
    center_distance: Literal["squared_euclidean", "euclidean", "cosine"] = "squared_euclidean"
    """Distance between an embedding and its class centre: ``squared_euclidean``,
    ``euclidean`` or ``cosine`` (``1 - cos``)."""
    center_learnable: bool = True
    """Learn the centres (their own optimizer, the backbone's type, LR schedule and
    momentum, no weight decay); false: fixed at their initial values."""
    triplet_weight: NonNegative = 0.0
    """Weight of the triplet loss over the global batch; 0 turns it off."""
    triplet_margin: NonNegative = 0.3
    """Triplet margin ``m`` in ``max(d(a, p) - d(a, n) + m, 0)``."""
    triplet_mining: Literal["batch_all", "batch_hard", "semi_hard"] = "batch_hard"
    """Triplet selection: ``batch_all``, ``batch_hard`` or ``semi_hard``."""
    triplet_distance: Literal["squared_euclidean", "cosine"] = "squared_euclidean"
    """Triplet distance: ``squared_euclidean`` (raw embeddings) or ``cosine``."""

    def check_rules(self) -> None:
        _check(
            self.center_distance != "cosine" or self.center_radius < 2.0,
            "aux.center_radius",
            "must be < 2 with aux.center_distance=cosine: the distance 1 - cos lies in "
            "[0, 2], so a radius of 2 or more makes the center loss 0 for every sample",
            self.center_radius,
        )
        _check(
            self.triplet_distance != "cosine" or self.triplet_margin < 2.0,
            "aux.triplet_margin",
            "must be < 2 with aux.triplet_distance=cosine: the distance 1 - cos lies in "
            "[0, 2], so no triplet could ever be separated by a margin of 2 or more",
            self.triplet_margin,
        )


@dataclass
class DistillConfig(Section):
    """Knowledge distillation from a frozen teacher backbone, online or from its cached
    embeddings (see docs/training.md, "Distillation"); off while ``teacher`` and
    ``cache`` are empty."""

    prefix: ClassVar[str] = "distill"
    teacher: str = field(
        default="",
        metadata=refuse("the distillation targets and the learned projection P are the teacher's"),
    )
    """The teacher: backbone weights (this project's ``backbone.pt`` or arcface_torch's
    ``backbone.pth``, read strictly by ``backbones.weights``) run frozen in inference mode
    on the student's device under its autocast, or an ONNX model (``.onnx``, any face
    model, its input convention read as ``eval`` reads it) run by onnxruntime (its CUDA
    provider on a GPU, sharing device memory). With ``cache`` it only names the teacher
    whose SHA-256 the cache must carry. Empty: no online teacher."""
    teacher_network: str = field(
        default="",
        metadata=refuse("the distillation targets and the learned projection P are the teacher's"),
    )
    """The teacher's network name in the backbone registry (e.g. ``r100``); empty: the
    student's ``model.network``; must stay empty for an ONNX teacher. Its input
    convention (size, mean/std, colour) may differ from the student's: the batch is
    converted on the device."""
    cache: str = field(
        default="",
        metadata=refuse("the distillation targets are the cached teacher's embeddings"),
    )
    """A directory of the teacher's embeddings of every training record, written once
    by ``python -m tools.teacher_embed`` (docs/training.md, "Cached teachers"): the
    loader serves them with each batch and no teacher runs while training. Refused at
    start-up if it was computed on other data or (with ``teacher`` set) by another
    teacher. Empty: the teacher runs online."""
    embedding_weight: NonNegative = field(default=0.0, metadata=MAY_CHANGE)
    """Weight of the embedding term ``1 - cos(P s, t)`` (or its ``l2`` form) in the total
    loss. With a teacher the term is always computed and logged (``distill_embedding``;
    0: monitored only), so ``P`` exists and a resume may change the weight."""
    relation_weight: NonNegative = field(default=0.0, metadata=MAY_CHANGE)
    """Weight of the relation term (the global batch's student cosine-similarity matrix
    against the teacher's, mean squared difference); 0 turns it off."""
    logit_weight: NonNegative = field(default=0.0, metadata=MAY_CHANGE)
    """Weight of the logit term: ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` with
    ``z = head.scale * cos(embedding, class centre)`` over every class of every rank
    (the head's distributed softmax; the centres are the student's, so the teacher's
    embedding size must equal ``model.embedding_size``); 0 turns it off."""
    temperature: PositiveFinite = field(default=1.0, metadata=MAY_CHANGE)
    """The logit term's softmax temperature ``T`` (> 0)."""
    embedding_kind: Literal["cosine", "l2"] = field(default="cosine", metadata=MAY_CHANGE)
    """The embedding term: ``cosine`` (``1 - cos(P s, t)``) or ``l2`` (squared distance of
    the normalised vectors, ``2 (1 - cos)``)."""

    @property
    def enabled(self) -> bool:
        """Whether the run distils (from an online teacher or a cache)."""
        return bool(self.teacher or self.cache)

    @property
    def teacher_is_onnx(self) -> bool:
        """Whether ``teacher`` is an ONNX model (by its ``.onnx`` suffix)."""
        return self.teacher.lower().endswith(".onnx")

    def check_rules(self) -> None:
        _check(
            isinstance(self.teacher, str),
            "distill.teacher",
            "must be a path to the teacher's backbone weights, or empty",
            self.teacher,
        )
        for key, weight in (
            ("distill.embedding_weight", self.embedding_weight),
            ("distill.relation_weight", self.relation_weight),
            ("distill.logit_weight", self.logit_weight),
        ):
            _check(
                weight == 0 or self.enabled,
                key,
                "is > 0 but distill.teacher and distill.cache are empty: set "
                "distill.teacher to the teacher's backbone weights (or distill.cache to "
                "its cached embeddings), or the weight to 0",
                weight,
            )
        _check(
            not self.teacher_network or bool(self.teacher),
            "distill.teacher_network",
            "is set but distill.teacher is empty",
            self.teacher_network,
        )
        _check(
            not (self.teacher_network and self.teacher_is_onnx),
            "distill.teacher_network",
            f"is set but distill.teacher {self.teacher!r} is an ONNX model, which carries "
            "its own network: leave it empty",
            self.teacher_network,
        )


@dataclass
class Config:
    """A complete training run."""

    name: str = field(default="run", metadata=MAY_CHANGE)
    """Short name of the recipe (used in logs)."""
    model: ModelConfig = field(
        default_factory=ModelConfig,
        metadata=refuse("the network's parameters are the checkpoint's"),
    )
    """Backbone."""
    head: HeadConfig = field(
        default_factory=HeadConfig,
        metadata=refuse("the head kind and its margins are part of what was learned"),
    )
    """Partial-FC head and margin."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizers."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig, metadata=MAY_CHANGE)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=MAY_CHANGE)
    """Checkpoints and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=MAY_CHANGE)
    """Verification."""
    log: LogConfig = field(default_factory=LogConfig, metadata=MAY_CHANGE)
    """Logging."""
    aux: AuxLossConfig = field(default_factory=AuxLossConfig, metadata=MAY_CHANGE)
    """Auxiliary losses (center, triplet); off by default."""
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata=MAY_CHANGE)
    """Batched training augmentations on the device; off by default."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation from a frozen teacher; off by default (each field declares
    its resume policy)."""

    def validate(self) -> Config:
        """Check every section; raise :class:`ConfigError` naming the first bad option."""
        for section in (
            self.model,
            self.head,
            self.data,
            self.optimizer,
            self.scheduler,
            self.train,
            self.checkpoint,
            self.eval,
            self.log,
            self.aux,
            self.augment,
            self.distill,
        ):
            section.validate()
        _check(
            self.scheduler.warmup_epochs < self.train.epochs,
            "scheduler.warmup_epochs",
            f"must be shorter than train.epochs={self.train.epochs} (the decay after the "
            "warm-up needs at least part of an epoch)",
            self.scheduler.warmup_epochs,
        )
        return self
