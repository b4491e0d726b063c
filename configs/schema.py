"""Typed training configuration: one dataclass per concern, validated as a whole.

Every field carries a docstring (the string literal under it); ``configs.describe``
prints them. Values are only ever *set* here or by overrides; quantities derived
from them (total steps, warm-up steps, per-rank class ranges) are computed by the
trainer and never written back into the configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the option."""


def _check(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message} (got {value!r})")


@dataclass
class ModelConfig:
    """The backbone network."""

    network: str = "r50"
    """Backbone name passed to ``backbones.get_model`` (e.g. ``r50``, ``r100``, ``mbf``)."""
    embedding_size: int = 512
    """Dimension of the face embedding produced by the backbone."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``backbones.get_model`` (e.g. ``model.kwargs.dropout=0.1``)."""

    def validate(self) -> None:
        _check(bool(self.network), "model.network", "must be a non-empty name", self.network)
        _check(self.embedding_size > 0, "model.embedding_size", "must be > 0", self.embedding_size)


@dataclass
class HeadConfig:
    """The Partial-FC classification head and its margin."""

    loss: Literal["arcface", "cosface", "sphereface", "combined"] = "arcface"
    """Margin type: additive angular (arcface), additive cosine (cosface),
    multiplicative angular (sphereface) or the combined ``cos(m1*t + m2) - m3``."""
    scale: float = 64.0
    """Logit scale ``s`` applied to the cosines; positive and finite."""
    margin: float = 0.5
    """Margin of arcface (radians, in [0, pi)), cosface (cosine, in [0, 2)) or
    sphereface (angle multiplier, >= 1); ignored by ``combined``."""
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
        _check(self.loss in kinds, "head.loss", f"must be one of {', '.join(kinds)}", self.loss)
        # head.margins_file replaces the kind's primary margin (its ``margin``; m2 for
        # combined), as trainer.build.build_margin passes it
        per_class = kinds[self.loss].primary
        if self.loss == "combined":
            checks = [("m1", self.m1, "head.m1"), ("m2", self.m2, "head.m2")]
            checks.append(("m3", self.m3, "head.m3"))
        else:
            checks = [(per_class, self.margin, "head.margin")]
        if self.margins_file:
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


@dataclass
class DataConfig:
    """Training data and its loader."""

    root: str = ""
    """Directory holding ``train.rec``, ``train.idx``, ``property`` and the ``.bin`` targets."""
    num_classes: int = 0
    """Number of identities; checked against the dataset's ``property``/header."""
    num_images: int = 0
    """Number of training images; checked against the dataset."""
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

    def validate(self) -> None:
        _check(bool(self.root), "data.root", "must name the dataset directory", self.root)
        _check(self.num_classes > 0, "data.num_classes", "must be > 0", self.num_classes)
        _check(self.num_images > 0, "data.num_images", "must be > 0", self.num_images)
        _check(self.batch_size > 0, "data.batch_size", "must be > 0", self.batch_size)
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
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

    def validate(self) -> None:
        _check(self.lr > 0, "optimizer.lr", "must be > 0", self.lr)
        _check(
            self.head_state_dtype in ("fp32", "bf16"),
            "optimizer.head_state_dtype",
            "must be fp32 or bf16",
            self.head_state_dtype,
        )
        _check(0.0 <= self.momentum < 1.0, "optimizer.momentum", "must be in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0", self.weight_decay)
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "optimizer.betas",
            "must be two values in [0, 1)",
            self.betas,
        )
        _check(self.eps > 0, "optimizer.eps", "must be > 0", self.eps)


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
            self.warmup_epochs >= 0, "scheduler.warmup_epochs", "must be >= 0", self.warmup_epochs
        )
        _check(
            0.0 < self.warmup_start_factor <= 1.0,
            "scheduler.warmup_start_factor",
            "must be in (0, 1]",
            self.warmup_start_factor,
        )
        _check(self.power > 0, "scheduler.power", "must be > 0", self.power)


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
    """Output directory: resolved config, logs, TensorBoard, checkpoints, exported weights."""
    max_bad_steps: int = 5
    """Stop with an error after this many consecutive steps with a non-finite loss or
    gradient (each such step is skipped: no parameter update, its batch keys logged)."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective may wait for its peers before the job fails naming the step
    (passed to ``init_process_group``); a hung or dead rank cannot block forever."""

    def validate(self) -> None:
        _check(self.epochs > 0, "train.epochs", "must be > 0", self.epochs)
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1", self.grad_accum)
        _check(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            "train.clip_grad_norm",
            "must be > 0 or null",
            self.clip_grad_norm,
        )
        _check(
            self.max_steps is None or self.max_steps > 0,
            "train.max_steps",
            "must be > 0 or null",
            self.max_steps,
        )
        _check(bool(self.output), "train.output", "must be a directory path", self.output)
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1", self.max_bad_steps)
        _check(
            self.collective_timeout_s > 0,
            "train.collective_timeout_s",
            "must be > 0 seconds",
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
        _check(self.every_steps >= 0, "eval.every_steps", "must be >= 0", self.every_steps)
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0", self.batch_size)


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
            _check(
                math.isfinite(value) and value >= 0, f"aux.{key}", "must be finite and >= 0", value
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
        ):
            section.validate()
        _check(
            math.isfinite(self.optimizer.lr),
            "optimizer.lr",
            "must be finite",
            self.optimizer.lr,
        )
        return self
