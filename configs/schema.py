"""Typed training configuration: one dataclass per concern, validated as a whole.

Every field carries a docstring (the string literal under it); ``configs.describe``
prints them. Values are only ever *set* here or by overrides; quantities derived
from them (total steps, warm-up steps, per-rank class ranges) are computed by the
trainer and never written back into the configuration.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration key or value is invalid; the message names the option (exit
    code 2, as for a bad command-line option)."""


def _check(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message} (got {value!r})")


def _finite(value: Any) -> bool:
    """``value`` is a real number that is neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


#: Upper bounds that keep derived quantities in range (see each check's message).
MAX_EPOCHS = 100_000
MAX_SEED = 2**32
MAX_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass
class ModelConfig:
    """The backbone network."""

    network: str = "r50"
    """Backbone name passed to ``backbones.get_model`` (e.g. ``r50``, ``r100``, ``mbf``)."""
    embedding_size: int = 512
    """Dimension of the face embedding produced by the backbone."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``backbones.get_model`` (e.g. ``model.kwargs.dropout=0.1``)."""
    init_from: str = ""
    """Backbone weights a new run starts from (fine-tuning): a ``backbone.pt``/``.pth``
    (this project's or arcface_torch's, DDP ``module.`` prefixes stripped) or a
    ``.safetensors`` file; loaded strictly before step 0, the head starts afresh. Ignored
    when the run resumes from a checkpoint (the checkpoint's weights win). Empty: random
    initialisation."""
    freeze_stem: bool = False
    """Freeze the stem (the layers before the first residual unit: conv/BN/PReLU of the
    ResNets and MobileFaceNets, the patch and position embeddings of the ViTs): no
    gradient, not in the optimizer, its BatchNorm statistics fixed."""
    freeze_units: int = 0
    """Freeze the first N residual units (blocks) in forward order, and the stem with
    them (a unit after a trained stem would see moving inputs); 0: none. Checked against
    the network's unit count at start-up."""
    freeze_bn_stats: bool = False
    """Keep every BatchNorm layer of the backbone in eval mode while training: it
    normalises with, and never updates, its running statistics (the pretrained ones);
    its affine weight and bias still train unless frozen."""

    def validate(self) -> None:
        _check(bool(self.network), "model.network", "must be a non-empty name", self.network)
        _check(self.embedding_size > 0, "model.embedding_size", "must be > 0", self.embedding_size)
        _check(
            isinstance(self.init_from, str),
            "model.init_from",
            "must be a path to backbone weights, or empty",
            self.init_from,
        )
        _check(
            isinstance(self.freeze_units, int) and self.freeze_units >= 0,
            "model.freeze_units",
            "must be >= 0 (the number of leading residual units to freeze)",
            self.freeze_units,
        )


#: Arguments of the batch-aware margins -> the head options that set them.
_BATCH_MARGIN_OPTIONS = {
    "h": "head.adaface_h",
    "t_alpha": "head.ema_alpha",
    "l_a": "head.magface_l_a",
    "u_a": "head.magface_u_a",
    "l_m": "head.magface_l_m",
    "u_m": "head.magface_u_m",
    "lambda_g": "head.magface_lambda_g",
    "std": "head.elastic_std",
    "kind": "head.elastic_kind",
}


@dataclass
class HeadConfig:
    """The Partial-FC classification head and its margin."""

    loss: Literal[
        "arcface",
        "cosface",
        "sphereface",
        "combined",
        "adaface",
        "magface",
        "curricular",
        "elastic",
    ] = "arcface"
    """Margin type: additive angular (arcface), additive cosine (cosface),
    multiplicative angular (sphereface), the combined ``cos(m1*t + m2) - m3``, or a
    batch-aware margin: adaface, magface, curricular, elastic (docs/partial_fc.md)."""
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
    sample_rate: float = 1.0
    """Fraction of negative class centres sampled per step (Partial FC), in (0, 1];
    1.0 = full softmax."""
    num_subcenters: int = 1
    """Sub-centres per class (sub-center ArcFace), >= 1; 1 disables them."""
    chunk_size: int | None = None
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
    interclass_filtering_threshold: float | None = None
    """Negatives whose cosine to a sample exceeds this are label conflicts; null: off."""
    interclass_filtering_mode: Literal["remove", "zero"] = "remove"
    """``remove``: drop conflicts from the softmax denominator; ``zero``: the reference
    implementation's behaviour (cosine set to 0, still counted)."""
    matmul_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the head's matrix products (bf16/fp16: tensor cores on GPU,
    fp32 accumulation and fp32 softmax statistics)."""
    backend: Literal["auto", "torch", "triton"] = "auto"
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
    init: Literal["random", "imprint"] = "random"
    """Initial class centres of a new run: ``random`` (N(0, 0.01^2), seeded by
    ``train.seed``) or ``imprint``: each centre points along the mean of its training
    images' L2-normalised embeddings under the initial backbone (``model.init_from``;
    the row keeps its random norm, which only sets its step size), computed in one
    rank-parallel pass before step 0; with sub-centres, sub-centre 0 is that mean and
    the others are nudged off it (docs/training.md, "Fine-tuning"). Classes without
    images keep the random centre. Not applied on resume."""

    def batch_margin(self) -> Any:
        """The batch-aware margin (``loss`` adaface, magface, curricular or elastic) these
        options describe; its constructor checks them (``ValueError`` says which)."""
        from partial_fc import AdaFace, CurricularFace, ElasticFace, MagFace

        if self.loss == "adaface":
            return AdaFace(self.scale, self.margin, h=self.adaface_h, t_alpha=self.ema_alpha)
        if self.loss == "magface":
            return MagFace(
                self.scale, self.magface_l_a, self.magface_u_a, self.magface_l_m,
                self.magface_u_m, self.magface_lambda_g,
            )  # fmt: skip
        if self.loss == "curricular":
            return CurricularFace(self.scale, self.margin, t_alpha=self.ema_alpha)
        return ElasticFace(
            self.scale, self.margin, std=self.elastic_std, kind=self.elastic_kind,
            plus=self.elastic_plus,
        )  # fmt: skip

    def validate(self) -> None:
        # The margin classes own the ranges of the scale and of m1/m2/m3; the same
        # checks run here so that a bad value stops the run before anything starts.
        from partial_fc.margins import (
            ArcFace,
            CombinedMargin,
            CosFace,
            SphereFace,
            check_margin,
            check_scale,
        )

        kinds = {
            "arcface": ArcFace,
            "cosface": CosFace,
            "sphereface": SphereFace,
            "combined": CombinedMargin,
        }
        batch_kinds = ("adaface", "magface", "curricular", "elastic")
        _check(
            self.loss in (*kinds, *batch_kinds),
            "head.loss",
            f"must be one of {', '.join((*kinds, *batch_kinds))}",
            self.loss,
        )
        if self.loss in batch_kinds:
            _check(
                not self.margins_file,
                "head.margins_file",
                f"per-class margins do not apply to head.loss={self.loss} (its margins come "
                "from the batch)",
                self.margins_file,
            )
            try:
                self.batch_margin()
            except ValueError as exc:  # name the config options, not the class arguments
                message = str(exc)
                for arg, option in _BATCH_MARGIN_OPTIONS.items():
                    message = re.sub(rf"\b{arg}\b", option, message)
                raise ConfigError(f"head.loss={self.loss}: {message}") from None
            checks = []
        elif self.loss == "combined":
            checks = [("m1", self.m1, "head.m1"), ("m2", self.m2, "head.m2")]
            checks.append(("m3", self.m3, "head.m3"))
        else:
            checks = [(kinds[self.loss].primary, self.margin, "head.margin")]
        # head.margins_file replaces the kind's primary margin (its ``margin``; m2 for
        # combined), as trainer.build.build_margin passes it
        per_class = kinds[self.loss].primary if self.loss in kinds else None
        if self.margins_file and per_class is not None:
            checks = [c for c in checks if c[0] != per_class]
            checks.append((per_class, self.margins_file, "head.margins_file"))
        try:
            check_scale(self.scale, "head.scale")
            for which, value, option in checks:
                check_margin(which, value, option)
        except OSError as exc:
            raise ConfigError(
                f"head.margins_file: cannot read {self.margins_file!r} ({exc.strerror or exc})"
            ) from None
        except ValueError as exc:  # the message names the option and says why
            raise ConfigError(str(exc)) from None
        threshold = self.interclass_filtering_threshold
        _check(
            threshold is None or -1.0 <= threshold <= 1.0,
            "head.interclass_filtering_threshold",
            "must be a cosine in [-1, 1] or null",
            threshold,
        )
        _check(
            self.interclass_filtering_mode in ("remove", "zero"),
            "head.interclass_filtering_mode",
            "must be 'remove' or 'zero'",
            self.interclass_filtering_mode,
        )
        _check(
            self.matmul_dtype in ("fp32", "bf16", "fp16"),
            "head.matmul_dtype",
            "must be fp32, bf16 or fp16",
            self.matmul_dtype,
        )
        _check(
            self.backend in ("auto", "torch", "triton"),
            "head.backend",
            "must be auto, torch or triton",
            self.backend,
        )
        if self.backend == "triton":
            from partial_fc.backend import triton_missing, triton_unsupported

            why = triton_missing() or triton_unsupported(
                num_subcenters=self.num_subcenters,
                filtering=threshold is not None,
                loss=self.loss,
            )
            if why:
                raise ConfigError(f"head.backend=triton: {why}; 'auto' runs such a head on torch")
        _check(
            0.0 < self.sample_rate <= 1.0,
            "head.sample_rate",
            "must be in (0, 1]: the fraction of negative class centres sampled per step",
            self.sample_rate,
        )
        _check(
            self.num_subcenters >= 1,
            "head.num_subcenters",
            "must be >= 1 (sub-centres per class)",
            self.num_subcenters,
        )
        _check(
            self.chunk_size is None or self.chunk_size > 0,
            "head.chunk_size",
            "must be > 0 classes per block, or null",
            self.chunk_size,
        )
        _check(
            self.init in ("random", "imprint"),
            "head.init",
            "must be random or imprint",
            self.init,
        )


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
class DataConfig:
    """Training data and its loader."""

    root: str | list[str] = ""
    """Training data: a directory holding ``train.rec``, ``train.idx``, ``property`` (and the
    ``.bin`` targets), a ``.rec`` file, a directory of Arrow shards or an image folder; or a
    list of them (``data.root=[/data/a,/data/b]``), kinds mixed, trained as one dataset whose
    label spaces are concatenated in list order (docs/data.md, "Several datasets")."""
    num_classes: int = 0
    """Number of identities (with several ``data.root``, their sum); checked against the
    data."""
    num_images: int = 0
    """Number of training images (with several ``data.root``, their sum); checked against
    the data."""
    weights: list[float] = field(default_factory=list)
    """Per-dataset sampling weights, one per ``data.root`` entry, each > 0: an epoch stays
    ``data.num_images`` samples, of which dataset i gives the share w_i / sum(w) (rounded
    by largest remainder; its images repeated or subsampled, seeded). Empty: every image
    once per epoch."""
    batch_size: int = 128
    """Per-rank micro-batch size (the global batch is ``batch_size * world_size``)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 loads in the training process)."""
    random_flip: bool = True
    """Horizontal-flip augmentation during training."""
    sampler: Literal["random", "pk"] = "random"
    """``random``: a seeded shuffle of all images; ``pk``: every rank's batch holds
    ``batch_size / data.pk_images_per_identity`` identities with that many images each
    (distinct identities across ranks), so triplet mining always finds positives."""
    pk_images_per_identity: int = 4
    """K of the P x K sampler (``data.sampler=pk``); must divide ``data.batch_size``."""
    pk_small_identity: Literal["replace", "drop"] = "replace"
    """P x K sampler: identities with fewer than K images are topped up with their own
    images (``replace``) or skipped (``drop``)."""
    skip_corrupt: bool = False
    """Skip corrupt samples (undecodable image, malformed record, bad ``.idx`` offset):
    each is logged with its file, key and offset, counted, and replaced by the next
    sample. Labels outside ``[0, num_classes)`` or not integers are never skipped.
    false: the first corrupt sample stops the run (``DataError``)."""
    max_skipped_fraction: float = 0.001
    """With ``data.skip_corrupt``: the run stops (``DataError``) once a rank's loader (its
    workers share the count) has skipped more distinct samples than this fraction of
    ``data.num_images``; in [0, 1)."""

    def roots(self) -> list[str]:
        """``data.root`` as a list (one entry for a single dataset)."""
        return list(self.root) if isinstance(self.root, list | tuple) else [self.root]

    def validate(self) -> None:
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
        _check(self.num_classes > 0, "data.num_classes", "must be > 0", self.num_classes)
        _check(self.num_images > 0, "data.num_images", "must be > 0", self.num_images)
        _check(self.batch_size > 0, "data.batch_size", "must be > 0", self.batch_size)
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        _check(
            _finite(self.max_skipped_fraction) and 0.0 <= self.max_skipped_fraction < 1.0,
            "data.max_skipped_fraction",
            "must be a fraction in [0, 1) of the training images that may be skipped as "
            "corrupt (1 or more would let a run train on no data at all)",
            self.max_skipped_fraction,
        )
        _check(
            self.sampler in ("random", "pk"), "data.sampler", "must be random or pk", self.sampler
        )
        if self.sampler == "pk":
            k = self.pk_images_per_identity
            _check(k >= 1, "data.pk_images_per_identity", "must be >= 1", k)
            _check(
                self.batch_size % k == 0,
                "data.pk_images_per_identity",
                f"must divide data.batch_size={self.batch_size}",
                k,
            )
            _check(
                self.pk_small_identity in ("replace", "drop"),
                "data.pk_small_identity",
                "must be replace or drop",
                self.pk_small_identity,
            )


@dataclass
class AugmentConfig:
    """Training augmentations applied to each batch on the device (``datasets/augment.py``),
    after the loader's flip; each stage is drawn per sample with its own probability. AdaFace
    trains with ``crop_prob = lowres_prob = photometric_prob = 0.2`` and no erasing."""

    crop_prob: float = 0.0
    """Probability of AdaFace's crop: a RandomResizedCrop rectangle kept in place, black
    around it (AdaFace: 0.2)."""
    crop_min_scale: float = 0.2
    """Smallest kept area as a fraction of the image (the largest is 1), in (0, 1]."""
    lowres_prob: float = 0.0
    """Probability of down-sampling to a random side and back up, each with a random OpenCV
    interpolation (AdaFace: 0.2)."""
    lowres_min_side: float = 0.2
    """Smallest low-resolution side as a fraction of the image side (the largest is 1), in
    [0.2, 1]."""
    photometric_prob: float = 0.0
    """Probability of ColorJitter: brightness, contrast and saturation in a random order
    (AdaFace: 0.2)."""
    brightness: float = 0.5
    """ColorJitter brightness strength s: factor ~ U(1 - s, 1 + s), s in [0, 1]."""
    contrast: float = 0.5
    """ColorJitter contrast strength s: factor ~ U(1 - s, 1 + s), s in [0, 1]."""
    saturation: float = 0.5
    """ColorJitter saturation strength s: factor ~ U(1 - s, 1 + s), s in [0, 1]."""
    erase_prob: float = 0.0
    """Probability of random erasing (torchvision's RandomErasing rectangle); AdaFace: 0."""
    erase_fill: Literal["noise", "constant"] = "noise"
    """Erased rectangle: uniform noise in [-1, 1] (``noise``) or ``augment.erase_value``."""
    erase_value: float = 0.0
    """Constant fill of ``erase_fill=constant``, in normalised units [-1, 1] (0 = mid grey)."""

    def validate(self) -> None:
        for key in (
            "crop_prob", "lowres_prob", "photometric_prob", "erase_prob", "brightness",
            "contrast", "saturation",
        ):  # fmt: skip
            value = getattr(self, key)
            _check(0.0 <= value <= 1.0, f"augment.{key}", "must lie in [0, 1]", value)
        _check(
            0.0 < self.crop_min_scale <= 1.0,
            "augment.crop_min_scale",
            "must lie in (0, 1]",
            self.crop_min_scale,
        )
        _check(
            0.2 <= self.lowres_min_side <= 1.0,
            "augment.lowres_min_side",
            "must lie in [0.2, 1]",
            self.lowres_min_side,
        )
        _check(
            self.erase_fill in ("noise", "constant"),
            "augment.erase_fill",
            "must be noise or constant",
            self.erase_fill,
        )
        _check(
            -1.0 <= self.erase_value <= 1.0,
            "augment.erase_value",
            "must lie in [-1, 1]",
            self.erase_value,
        )


@dataclass
class OptimizerConfig:
    """Optimizer shared by the backbone (torch) and the head (row-sparse Partial-FC)."""

    name: Literal["sgd", "adamw"] = "sgd"
    """``sgd`` (momentum, L2 weight decay) or ``adamw`` (decoupled weight decay)."""
    lr: float = 0.1
    """Peak learning rate, reached at the end of warm-up."""
    momentum: float = 0.9
    """SGD momentum (``sgd`` only)."""
    weight_decay: float = 5e-4
    """Weight decay for backbone and head."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment decay rates (``adamw`` only)."""
    eps: float = 1e-8
    """AdamW denominator epsilon (``adamw`` only)."""
    head_state_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage of the head optimizer's momentum / Adam moments: ``bf16`` halves their
    memory (updates are still computed in fp32; see docs/partial_fc.md for the measured
    trade-off)."""
    backbone_lr_mult: float = 1.0
    """The backbone's learning rate is ``optimizer.lr`` times this (> 0; the head's is
    ``optimizer.lr``); both follow the same schedule. Fine-tuning uses < 1."""
    weight_decay_exclude_norm_bias: bool = False
    """Exclude the backbone's normalisation, PReLU and bias parameters (every parameter
    with at most one dimension, or named ``*.bias``; timm's convention) from weight decay.
    false: decay on every parameter, as arcface_torch does."""

    def validate(self) -> None:
        _check(
            _finite(self.lr) and self.lr > 0,
            "optimizer.lr",
            "must be finite and > 0",
            self.lr,
        )
        _check(self.name in ("sgd", "adamw"), "optimizer.name", "must be sgd or adamw", self.name)
        _check(
            self.head_state_dtype in ("fp32", "bf16"),
            "optimizer.head_state_dtype",
            "must be fp32 or bf16",
            self.head_state_dtype,
        )
        _check(
            _finite(self.momentum) and 0.0 <= self.momentum < 1.0,
            "optimizer.momentum",
            "must be in [0, 1): the velocity is multiplied by it every step, and 1 or more "
            "never forgets a gradient (it grows without bound)",
            self.momentum,
        )
        _check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            "optimizer.weight_decay",
            "must be finite and >= 0",
            self.weight_decay,
        )
        _check(
            len(self.betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas),
            "optimizer.betas",
            "must be two values in [0, 1): Adam's moment averages and their bias "
            "correction 1 - beta**t divide by zero at 1",
            self.betas,
        )
        _check(
            _finite(self.eps) and 0 < self.eps < 1,
            "optimizer.eps",
            "must be in (0, 1): it only guards Adam's division by the second moment",
            self.eps,
        )
        _check(
            self.lr * self.weight_decay < 1.0,
            "optimizer.weight_decay",
            f"times optimizer.lr={self.lr:g} must be < 1: every step scales the weights by "
            "(1 - lr * weight_decay), which is then zero or negative",
            self.weight_decay,
        )
        _check(
            _finite(self.backbone_lr_mult) and self.backbone_lr_mult > 0,
            "optimizer.backbone_lr_mult",
            "must be finite and > 0 (to keep backbone layers fixed, use model.freeze_stem / "
            "model.freeze_units)",
            self.backbone_lr_mult,
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
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up, then polynomial decay to zero."""

    warmup_epochs: float = 0.0
    """Length of the linear warm-up in epochs (converted to optimizer steps at start-up)."""
    warmup_start_factor: float = 0.01
    """LR at step 0 as a fraction of ``optimizer.lr`` (small but non-zero)."""
    power: float = 2.0
    """Exponent of the polynomial decay ``(1 - progress) ** power``."""

    def validate(self) -> None:
        _check(
            _finite(self.warmup_epochs) and self.warmup_epochs >= 0,
            "scheduler.warmup_epochs",
            "must be finite and >= 0",
            self.warmup_epochs,
        )
        _check(
            _finite(self.warmup_start_factor) and 0.0 < self.warmup_start_factor <= 1.0,
            "scheduler.warmup_start_factor",
            "must be in (0, 1]",
            self.warmup_start_factor,
        )
        _check(
            _finite(self.power) and self.power > 0,
            "scheduler.power",
            "must be finite and > 0 (the decay (1 - progress) ** power)",
            self.power,
        )


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 20
    """Number of passes over the training set; fixes the schedule's length."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (loss averaged over them)."""
    clip_grad_norm: float | None = 5.0
    """Max global L2 norm of backbone and head gradients together; ``null`` disables."""
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    """Backbone autocast dtype on CUDA (``fp16`` adds a grad scaler); ignored on CPU.
    The head always runs in fp32."""
    seed: int = 0
    """Seed for initialisation, sampling and data order."""
    max_steps: int | None = None
    """Stop after this optimizer step (the schedule still spans ``epochs``); ``null`` = end."""
    output: str = "work_dirs/run"
    """Output directory: resolved config, logs, TensorBoard, checkpoints, exported weights.
    Owned by training (``.owner.json``): a non-empty directory that training did not make
    is refused, naming what it holds (see ``train.overwrite``); never the root directory."""
    overwrite: bool = False
    """Write into a ``train.output`` that is not empty and was not made by training (a
    dataset, another command's output, ...); files the run does not write are kept. A
    directory of an earlier training run is always resumed into, without this."""
    max_bad_steps: int = 5
    """Stop with an error after this many consecutive steps with a non-finite loss or
    gradient (each such step is skipped: no parameter update, its batch keys logged)."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective may wait for its peers before the job fails naming the step
    (passed to ``init_process_group``); a hung or dead rank cannot block forever."""

    def validate(self) -> None:
        _check(
            0 < self.epochs <= MAX_EPOCHS,
            "train.epochs",
            f"must be in [1, {MAX_EPOCHS}] (the schedule, step counters and ETA are "
            "derived from it)",
            self.epochs,
        )
        _check(
            1 <= self.grad_accum <= 65536,
            "train.grad_accum",
            "must be in [1, 65536] micro-batches per optimizer step",
            self.grad_accum,
        )
        _check(
            self.clip_grad_norm is None
            or (_finite(self.clip_grad_norm) and self.clip_grad_norm > 0),
            "train.clip_grad_norm",
            "must be finite and > 0, or null to disable clipping",
            self.clip_grad_norm,
        )
        _check(
            self.amp in ("bf16", "fp16", "none"),
            "train.amp",
            "must be bf16, fp16 or none",
            self.amp,
        )
        _check(
            0 <= self.seed < MAX_SEED,
            "train.seed",
            "must be in [0, 2**32): the per-rank and loader seeds derived from it "
            "(seed + 1000003 * (rank + 1), seed * 7919 + rank) must stay within the "
            "64-bit seeds torch accepts",
            self.seed,
        )
        _check(
            self.max_steps is None or 0 < self.max_steps <= 2**40,
            "train.max_steps",
            "must be in [1, 2**40] or null",
            self.max_steps,
        )
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
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1", self.max_bad_steps)
        _check(
            _finite(self.collective_timeout_s) and 0 < self.collective_timeout_s <= MAX_TIMEOUT_S,
            "train.collective_timeout_s",
            f"must be finite, > 0 and <= {MAX_TIMEOUT_S:g} seconds (7 days): it is the "
            "process group's timeout, and an infinite one would let a hung peer block forever",
            self.collective_timeout_s,
        )


@dataclass
class CheckpointConfig:
    """Periodic, atomic, resharding-capable checkpoints."""

    every_steps: int = 2000
    """Save every this many optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Number of most recent complete checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """``auto`` (latest complete checkpoint in the output dir, if any), ``none``,
    or the path of a checkpoint directory."""

    def validate(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0", self.every_steps)
        _check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1", self.keep_last)
        _check(bool(self.resume), "checkpoint.resume", "must be auto, none or a path", self.resume)


@dataclass
class EvalConfig:
    """Periodic verification on ``.bin`` pair files."""

    targets: list[str] = field(default_factory=lambda: ["lfw", "cfp_fp", "agedb_30"])
    """Names of ``<data.root>/<name>.bin`` files (or paths) to verify on."""
    every_steps: int = 2000
    """Verify every this many optimizer steps (and at the end); 0 = only at the end."""
    at_start: bool = False
    """Also verify before the first step (shows the untrained baseline)."""
    batch_size: int = 256
    """Per-rank batch size for embedding extraction."""

    def validate(self) -> None:
        from pathlib import Path

        _check(self.every_steps >= 0, "eval.every_steps", "must be >= 0", self.every_steps)
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0", self.batch_size)
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


@dataclass
class LogConfig:
    """Rank-0 logging."""

    every_steps: int = 50
    """Log a line (and TensorBoard scalars) every this many optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars under ``<train.output>/tensorboard``."""
    progress_bar: bool = True
    """Show a tqdm progress bar, only when stderr is a terminal."""

    def validate(self) -> None:
        _check(self.every_steps > 0, "log.every_steps", "must be > 0", self.every_steps)


@dataclass
class AuxLossConfig:
    """Auxiliary losses added to the head loss (see ``docs/aux_losses.md``)."""

    center_weight: float = 0.0
    """Weight of the sharded center loss in the total loss; 0 turns it off."""
    center_radius: float = 0.0
    """Center loss hinge radius ``r``: distances below it cost nothing."""
    center_distance: Literal["squared_euclidean", "euclidean", "cosine"] = "squared_euclidean"
    """Distance between an embedding and its class centre: ``squared_euclidean``,
    ``euclidean`` or ``cosine`` (``1 - cos``)."""
    center_learnable: bool = True
    """Learn the centres (their own optimizer, the backbone's type, LR schedule and
    momentum, no weight decay); false: fixed at their initial values."""
    triplet_weight: float = 0.0
    """Weight of the triplet loss over the global batch; 0 turns it off."""
    triplet_margin: float = 0.3
    """Triplet margin ``m`` in ``max(d(a, p) - d(a, n) + m, 0)``."""
    triplet_mining: Literal["batch_all", "batch_hard", "semi_hard"] = "batch_hard"
    """Triplet selection: ``batch_all``, ``batch_hard`` or ``semi_hard``."""
    triplet_distance: Literal["squared_euclidean", "cosine"] = "squared_euclidean"
    """Triplet distance: ``squared_euclidean`` (raw embeddings) or ``cosine``."""

    def validate(self) -> None:
        for key in ("center_weight", "center_radius", "triplet_weight", "triplet_margin"):
            value = getattr(self, key)
            _check(_finite(value) and value >= 0, f"aux.{key}", "must be finite and >= 0", value)
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
        _check(
            self.center_distance in ("squared_euclidean", "euclidean", "cosine"),
            "aux.center_distance",
            "must be squared_euclidean, euclidean or cosine",
            self.center_distance,
        )
        _check(
            self.triplet_mining in ("batch_all", "batch_hard", "semi_hard"),
            "aux.triplet_mining",
            "must be batch_all, batch_hard or semi_hard",
            self.triplet_mining,
        )
        _check(
            self.triplet_distance in ("squared_euclidean", "cosine"),
            "aux.triplet_distance",
            "must be squared_euclidean or cosine",
            self.triplet_distance,
        )


@dataclass
class Config:
    """A complete training run."""

    name: str = "run"
    """Short name of the recipe (used in logs)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Partial-FC head and margin."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizers."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Verification."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    aux: AuxLossConfig = field(default_factory=AuxLossConfig)
    """Auxiliary losses (center, triplet); off by default."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Batched training augmentations on the device; off by default."""

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
