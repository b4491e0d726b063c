"""Assemble a :class:`~trainer.loop.Trainer` from a configuration: backbone, head, data,
verification targets. Checks the configuration against the data before training."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from backbones.registry import get_model, input_spec
from common.digest import sha256_file
from common.dist import DistContext
from common.rng import seed_everything
from configs import Config, ConfigError, HeadConfig
from datasets.dataset import FaceDataset
from datasets.errors import DataError
from datasets.loader import FaceLoader
from datasets.multi import WeightedDatasetSampler, dataset_table, open_datasets
from datasets.pk_sampler import PKSampler
from datasets.teacher_cache import TeacherCache, dataset_signature
from eval.bin_io import load_bin
from eval.pair_verification import verify_targets
from partial_fc import CombinedMargin, PartialFC, ShardedCenterLoss, TripletLoss, registry
from partial_fc.distill import Distiller
from trainer.distillation import Distillation
from trainer.finetune import freeze_backbone, init_new_run
from trainer.loop import AuxLosses, Evaluator, Trainer
from trainer.preflight import OutputDirError, checkpoint_bytes_estimate, probe_output
from trainer.teacher import Teacher

log = logging.getLogger("trainer")


def build_margin(cfg: HeadConfig) -> CombinedMargin:
    """The margin object of ``head.loss``, from the margin registry (its options read from
    ``head.*``; per-class margins from ``head.margins_file``)."""
    return registry.build_margin(cfg.loss, vars(cfg), per_class=cfg.margins_file or None)


_MATMUL_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_head(cfg: Config, device: torch.device) -> torch.nn.Module:
    """This rank's :class:`partial_fc.PartialFC` shard (default process group).

    Every rank's micro-batch is ``data.batch_size`` (the loader drops the last
    incomplete batch), so the head pads to it and skips the per-step exchange of
    batch sizes (``max_local_batch``).
    """

    return PartialFC(
        cfg.data.num_classes,
        cfg.model.embedding_size,
        build_margin(cfg.head),
        num_subcenters=cfg.head.num_subcenters,
        sample_rate=cfg.head.sample_rate,
        chunk_classes=cfg.head.chunk_size,
        seed=cfg.train.seed,
        max_local_batch=cfg.data.batch_size,
        interclass_filtering_threshold=cfg.head.interclass_filtering_threshold,
        interclass_filtering_mode=cfg.head.interclass_filtering_mode,
        matmul_dtype=_MATMUL_DTYPES[cfg.head.matmul_dtype],
        backend=cfg.head.backend,
        device=device,
    )


def build_aux_losses(
    cfg: Config, device: torch.device, teacher_cache: TeacherCache | None = None
) -> AuxLosses:
    """The auxiliary losses whose ``aux.*_weight`` is non-zero (default process group).

    Like the head, they pad every rank's batch to ``data.batch_size``; the centres are
    seeded by ``train.seed`` (identical for every world size). ``teacher_cache`` is the
    loader's (``distill.cache``): the distillation then runs no teacher."""

    aux = cfg.aux
    center = triplet = None
    if aux.center_weight > 0:
        center = ShardedCenterLoss(
            cfg.data.num_classes,
            cfg.model.embedding_size,
            radius=aux.center_radius,
            learnable=aux.center_learnable,
            distance=aux.center_distance,
            seed=cfg.train.seed,
            max_local_batch=cfg.data.batch_size,
            device=device,
        )
    if aux.triplet_weight > 0:
        triplet = TripletLoss(
            aux.triplet_margin,
            mining=aux.triplet_mining,
            distance=aux.triplet_distance,
            max_local_batch=cfg.data.batch_size,
        )
    distill = build_distillation(cfg, device, teacher_cache)
    return AuxLosses(center=center, triplet=triplet, distill=distill)


#: Added to ``train.seed`` for the projection P's initialisation (its own stream).
_PROJECTION_SEED = 28_002


def build_distillation(
    cfg: Config, device: torch.device, teacher_cache: TeacherCache | None = None
) -> Distillation | None:
    """The teacher and the distillation terms of ``distill.*`` (``None`` without a
    teacher or a cache), on ``device`` (default process group, batches padded to
    ``data.batch_size``: no host sync). With ``teacher_cache`` (opened and checked by
    :func:`open_teacher_cache`) no teacher is built: the loader serves its rows.

    The embedding term is always built (weight 0: logged only), so the projection ``P``
    exists whenever the sizes differ and a resume may change the weights; the relation
    term only with ``distill.relation_weight > 0``. ``P`` is initialised from its own
    stream seeded by ``train.seed``: identical on every rank and for every world size.

    Raises:
        ConfigError: ``distill.teacher`` is not a file, or ``distill.teacher_network``
            is not a known network (both name the option).
        ModelError: an ONNX teacher that cannot be read (naming the file).
        BackboneWeightsError, TeacherError: the file is not that network's weights, or
            the network does not take its input (the message names the file).
    """
    dc = cfg.distill
    if not dc.enabled:
        return None
    if dc.cache and teacher_cache is None:
        raise ValueError("distill.cache is set: pass the loader's opened teacher cache")
    teacher: Teacher | None = None
    if teacher_cache is not None:
        teacher_size = teacher_cache.embedding_size
    else:
        _check_teacher_file(dc.teacher)
        network = None  # an ONNX teacher carries its own (configs refuse naming one)
        if not dc.teacher_is_onnx:
            network = dc.teacher_network or cfg.model.network
            key = "distill.teacher_network" if dc.teacher_network else "model.network"
            try:
                input_spec(network)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        teacher = Teacher.load(dc.teacher, network, input_spec(cfg.model.network), device)
        teacher_size = teacher.embedding_size
    if dc.logit_weight > 0 and teacher_size != cfg.model.embedding_size:
        raise ConfigError(
            f"distill.logit_weight: the logit term needs the teacher's embeddings "
            f"({teacher_size} dimensions, {dc.cache or dc.teacher}) in the student's class "
            f"space (model.embedding_size={cfg.model.embedding_size}); set it to 0 or use a "
            "teacher of the student's embedding size"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + _PROJECTION_SEED)
        distiller = Distiller(
            cfg.model.embedding_size,
            teacher_size,
            embedding=dc.embedding_kind,
            relation=dc.relation_weight > 0,
            max_local_batch=cfg.data.batch_size,
            logit=dc.logit_weight > 0,
            logit_scale=cfg.head.scale,
            temperature=dc.temperature,
            num_subcenters=cfg.head.num_subcenters,
            chunk_classes=cfg.head.chunk_size,
        )
    weights = {
        "embedding": dc.embedding_weight,
        "relation": dc.relation_weight,
        "logit": dc.logit_weight,
    }
    return Distillation(teacher, distiller.to(device), weights)


def _check_teacher_file(path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"distill.teacher: no such file {path!r} (the teacher's weights)")


def open_teacher_cache(cfg: Config, dataset: FaceDataset) -> TeacherCache | None:
    """``distill.cache`` opened and checked against the training data (record count,
    labels, data files) and, when ``distill.teacher`` is set, against that file's
    SHA-256; ``None`` without a cache.

    Raises:
        TeacherCacheError: a malformed cache, or one of other data or another teacher
            (naming ``distill.cache``, the file and the mismatch).
    """
    dc = cfg.distill
    if not dc.cache:
        return None
    cache = TeacherCache.open(dc.cache, option="distill.cache")
    teacher_sha256 = None
    if dc.teacher:
        _check_teacher_file(dc.teacher)
        teacher_sha256 = sha256_file(dc.teacher)
    cache.check_matches(dataset_signature(dataset), teacher_sha256, option="distill.cache")
    log.info(
        "distill.cache: %d records' embeddings (D=%d) of teacher %s (sha256 %s...)%s",
        cache.records,
        cache.embedding_size,
        cache.manifest.get("teacher", "?"),
        cache.manifest["teacher_sha256"][:16],
        ", flip-averaged" if cache.manifest["flip"] else "",
    )
    return cache


def build_backbone(cfg: Config) -> torch.nn.Module:
    """``backbones.get_model`` for ``model.*``, with the option named on a bad keyword."""

    try:
        return get_model(
            cfg.model.network, embedding_size=cfg.model.embedding_size, **cfg.model.kwargs
        )
    except ValueError as exc:
        raise ConfigError(f"model.network: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"model.kwargs: {exc}") from None


def model_input_size(cfg: Config) -> int:
    """The side of the images ``model.network`` reads (its registry entry's input spec)."""
    try:
        return input_spec(cfg.model.network).size
    except ValueError as exc:
        raise ConfigError(f"model.network: {exc}") from None


def build_loader(cfg: Config, ctx: DistContext) -> FaceLoader:
    """The training loader; checks ``data.num_classes`` and ``data.num_images``.

    Problems with the data files themselves (a malformed ``.idx``, ``property`` or
    manifest, a record or label that is wrong) raise :class:`datasets.errors.DataError`
    naming the file, key and offset; a configuration that does not match sound data
    raises :class:`ConfigError` naming the option. ``data.skip_corrupt`` and
    ``data.max_skipped_fraction`` reach the dataset.

    Several ``data.root`` entries are opened as one
    :class:`datasets.multi.ConcatFaceDataset` (labels concatenated in list order);
    ``data.num_classes``/``data.num_images`` are checked against their sums, and
    ``data.weights`` selects :class:`datasets.multi.WeightedDatasetSampler`.
    """

    roots = cfg.data.roots()
    several = len(roots) > 1
    for i, root in enumerate(roots):
        if not Path(root).exists():
            key = f"data.root[{i}]" if several else "data.root"
            raise ConfigError(f"{key}: {root!r} does not exist")
    try:
        dataset = open_datasets(
            roots,
            option="data.root",
            flip=cfg.data.random_flip,
            num_classes=cfg.data.num_classes,
            skip_corrupt=cfg.data.skip_corrupt,
            max_skipped_fraction=cfg.data.max_skipped_fraction,
        )
    except DataError:
        raise  # names the file, key and offset; not a configuration problem
    except FileNotFoundError as exc:
        raise DataError(str(exc), path=getattr(exc, "filename", None)) from None
    except ValueError as exc:  # num_classes given vs found in the data
        raise ConfigError(f"data.num_classes: {exc}") from None
    table = dataset_table(dataset)
    where = "data.root" if several else roots[0]
    if dataset.num_classes != cfg.data.num_classes:
        parts = " + ".join(f"{e['num_classes']} ({e['name']})" for e in table)
        raise ConfigError(
            f"data.num_classes={cfg.data.num_classes} but {where} holds {dataset.num_classes}"
            + (f" = {parts}" if several else "")
        )
    if len(dataset) != cfg.data.num_images:
        parts = " + ".join(f"{e['num_images']} ({e['name']})" for e in table)
        raise ConfigError(
            f"data.num_images={cfg.data.num_images} but {where} holds {len(dataset)}"
            + (f" = {parts}" if several else "")
        )
    sampler = None
    if cfg.data.weights:
        sampler = WeightedDatasetSampler(
            [e["num_images"] for e in table],
            cfg.data.weights,
            batch_size=cfg.data.batch_size,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=cfg.train.seed,
        )
    if cfg.data.sampler == "pk":
        k = cfg.data.pk_images_per_identity
        labels = dataset.labels()  # a bad label raises DataError naming its record
        try:
            sampler = PKSampler(
                labels,
                p=cfg.data.batch_size // k,
                k=k,
                rank=ctx.rank,
                world_size=ctx.world_size,
                seed=cfg.train.seed,
                small_identity=cfg.data.pk_small_identity,
            )
        except ValueError as exc:
            raise ConfigError(f"data.sampler=pk: {exc}") from None
    return FaceLoader(
        dataset,
        targets=open_teacher_cache(cfg, dataset),
        sampler=sampler,
        batch_size=cfg.data.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        device=ctx.device,
    )


def resolve_target(cfg: Config, name: str) -> Path:
    """``eval.targets`` entry -> ``.bin`` path (a path, or a name under ``data.root``;
    with several roots, the first that holds it)."""
    path = Path(name)
    if path.suffix == ".bin" and path.exists():
        return path
    candidates = [Path(root) / f"{name}.bin" for root in cfg.data.roots()]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    listed = candidates[0] if len(candidates) == 1 else f"{name}.bin in any data.root"
    raise ConfigError(f"eval.targets: no {listed} (nor a file {name!r})")


def build_evaluator(cfg: Config) -> Evaluator | None:
    """A collective verification callable over the configured ``.bin`` targets.

    Every target is read, checked and decoded here, at start-up (with the bounded
    reader of :func:`eval.bin_io.load_bin`): a missing or bad ``.bin`` stops the run
    before training with a :class:`ConfigError` naming ``eval.targets`` and the file,
    not at the final verification hours later.
    """
    if not cfg.eval.targets:
        return None
    side = model_input_size(cfg)
    import pickle

    targets = {}
    for name in cfg.eval.targets:
        path = resolve_target(cfg, name)
        try:
            targets[Path(name).stem] = load_bin(str(path), image_size=(side, side))
        except (ValueError, pickle.UnpicklingError, EOFError, OSError) as exc:
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            raise ConfigError(f"eval.targets: {name!r}: {message}") from None
    batch_size = cfg.eval.batch_size

    def evaluate(model: torch.nn.Module) -> dict[str, dict[str, float]]:
        return verify_targets(model, targets, batch_size=batch_size)

    return evaluate


def check_batch_norm(backbone: torch.nn.Module, cfg: Config) -> None:
    """BatchNorm in training mode needs at least 2 samples per rank and step."""
    if cfg.data.batch_size >= 2:
        return
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size}: model.network={cfg.model.network!r} has "
            "BatchNorm layers, whose training statistics need at least 2 samples per rank "
            "(data.batch_size is per rank)"
        )


def check_embedding_size(backbone: torch.nn.Module, cfg: Config) -> None:
    """Run the backbone once on two blank images (eval mode, no gradient) and check
    that it produces ``model.embedding_size`` features, as the head expects."""

    size = model_input_size(cfg)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(2, 3, size, size))
    except RuntimeError as exc:
        raise ConfigError(
            f"model.network={cfg.model.network!r} cannot run on {size}x{size} images: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    finally:
        backbone.train(was_training)
    if out.dim() != 2 or out.shape[1] != cfg.model.embedding_size:
        raise ConfigError(
            f"model.network={cfg.model.network!r} produces embeddings of shape "
            f"{tuple(out.shape[1:])}, but the head expects model.embedding_size="
            f"{cfg.model.embedding_size}"
        )


def check_output_space(trainer: Trainer, ctx: DistContext) -> None:
    """Every rank: ``train.output`` is writable; rank 0: it has room for a checkpoint,
    once the leftovers of interrupted saves (``checkpoints/.tmp-step-*``, ours) are
    removed. Raises :class:`~trainer.preflight.OutputDirError` on every rank if any rank
    fails."""

    required = 0
    if ctx.is_main:
        storage = trainer.checkpointer.storage
        removed = storage.remove_leftovers()
        if removed:
            log.info(
                "removed %d leftover(s) of interrupted checkpoint saves in %s: %s",
                len(removed),
                storage.directory,
                ", ".join(p.name for p in removed),
            )
        modules = [trainer.backbone, trainer.head]
        if trainer.center is not None:
            modules.append(trainer.center)
        required = checkpoint_bytes_estimate(modules, ctx.world_size)
    try:
        probe_output(trainer.output, ctx.rank, required)
        error = None
    except OutputDirError as exc:
        error = str(exc)
    errors = [e for e in ctx.all_gather_object(error) if e]
    if errors:
        raise OutputDirError(errors[0])


def build_trainer(cfg: Config, ctx: DistContext) -> Trainer:
    """Everything from the configuration; resumes per ``checkpoint.resume``."""
    loader = build_loader(cfg, ctx)  # first: a data/config mismatch fails fast
    evaluator = build_evaluator(cfg)
    seed_everything(cfg.train.seed)  # identical initial backbone on every rank
    backbone = build_backbone(cfg)
    check_batch_norm(backbone, cfg)
    check_embedding_size(backbone, cfg)
    freeze = freeze_backbone(backbone, cfg.model)  # before the optimizer and DDP see it
    if freeze.frozen_params and ctx.is_main:
        log.info(
            "frozen: %d backbone parameters (stem%s, %s); %d BatchNorm layers in eval",
            len(freeze.frozen_params),
            f" + {cfg.model.freeze_units} of {freeze.num_units} units"
            if cfg.model.freeze_units
            else "",
            freeze.family,
            len(freeze.eval_norms or ()),
        )
    head = build_head(cfg, ctx.device)
    aux = build_aux_losses(cfg, ctx.device, teacher_cache=loader.targets)
    seed_everything(cfg.train.seed + 1_000_003 * (ctx.rank + 1))  # per-rank streams
    trainer = Trainer(cfg, backbone, head, loader, ctx, evaluator, aux)
    check_output_space(trainer, ctx)
    if trainer.maybe_resume() is None:
        # a new run: model.init_from and head.init=imprint (a resume's checkpoint wins)
        init_new_run(trainer)
    return trainer
