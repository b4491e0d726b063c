"""trainer: tests written against planted bugs that the rest of the suite let through
(issue 26).

* the resume policy over **every** configuration field, enumerated from the schema:
  each is either declared changeable or refused, and the changeable ones are exactly the
  reviewed set below, each with the reason it may change;
* every rank's checkpoint files carry a SHA-256, and a non-zero rank's file damaged
  with *finite* values (which no finiteness check can see) is refused for its checksum;
* with augmentation on, each rank augments its batch with its own rank's random stream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from common.dist import DistContext
from configs import Config, config_to_dict
from configs.overrides import valid_keys
from configs.resume_policy import resume_policies
from datasets.augment import BatchAugment
from partial_fc import ArcFace, PartialFC
from tests.distributed import device_under_test, run_ranks
from tests.trainer.test_trainer import CLASSES, EMB, TensorLoader, dataset, make_cfg, make_trainer
from trainer.checkpoint import compare_configs
from trainer.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------- the resume policy
#: Every option a resumed run may change, reviewed one by one: why changing it does not
#: change what the checkpoint's state means. A new configuration field that its
#: declaration (``metadata=MAY_CHANGE`` on the field or its section, configs/schema.py)
#: makes changeable fails test_every_config_field_is_changeable_or_refused until it is
#: reviewed here; one that declares nothing is refused.
CHANGEABLE: dict[str, str] = {
    "name": "a label of the run",
    "model.init_from": "how a new run starts; a resume's checkpoint wins over it",
    "model.freeze_bn_stats": "whether BatchNorm statistics update; no parameter changes shape",
    "head.sample_rate": "which classes a step samples; the head's rows stay the same",
    "head.sample_rate_schedule": "the sampling rate of later steps: a pure function of the "
    "step, no saved state depends on past rates",
    "distill.embedding_kind": "how the embedding term is measured; P exists either way",
    "distill.embedding_weight": "a loss weight; P exists whenever a teacher is set",
    "distill.relation_weight": "a loss weight; the relation term has no state",
    "distill.logit_weight": "a loss weight; the logit term has no state (it reads the head)",
    "distill.temperature": "the logit term's softmax temperature; no state",
    "log.backends": "where the run is reported, not what it trains",
    "log.experiment": "the tracker's experiment name",
    "log.mlflow_uri": "where MLflow records the run",
    "head.chunk_size": "how the logits are computed in blocks, not their values",
    "head.interclass_filtering_threshold": "a per-step filter of negatives; no state",
    "head.interclass_filtering_mode": "a per-step filter of negatives; no state",
    "head.matmul_dtype": "the precision of the products, not what is learned",
    "head.backend": "which kernels compute the same loss",
    "head.init": "how a new head starts; a resume's checkpoint wins over it",
    "data.root": "where the data lives; its identity is checked by the dataset table",
    "data.batch_size": "per-rank batch; the sampler's position counts samples",
    "data.num_workers": "loader processes",
    "data.random_flip": "an augmentation of the samples, not their order",
    "data.skip_corrupt": "what happens to unreadable samples",
    "data.max_skipped_fraction": "what happens to unreadable samples",
    "optimizer.lr": "a hyper-parameter: taken from this run (schedule recomputed)",
    "optimizer.momentum": "a hyper-parameter: taken from this run",
    "optimizer.weight_decay": "a hyper-parameter: taken from this run",
    "optimizer.betas": "a hyper-parameter: taken from this run",
    "optimizer.eps": "a hyper-parameter: taken from this run",
    "optimizer.head_state_dtype": "the storage of the head's moments; values are cast",
    "optimizer.backbone_lr_mult": "a hyper-parameter: taken from this run",
    "scheduler.warmup_epochs": "the schedule, recomputed at the resumed step",
    "scheduler.warmup_start_factor": "the schedule, recomputed at the resumed step",
    "scheduler.power": "the schedule, recomputed at the resumed step",
    "train.epochs": "the run's length",
    "train.max_steps": "the run's length",
    "train.grad_accum": "how a step's gradient is computed, not the state",
    "train.clip_grad_norm": "how a step's gradient is computed, not the state",
    "train.amp": "the precision of the steps, not the state",
    "train.max_bad_steps": "when a run gives up",
    "train.collective_timeout_s": "when a run gives up",
    "train.output": "where the run writes",
    "train.overwrite": "whether the output directory may be reused",
    "checkpoint.every_steps": "when checkpoints are written",
    "checkpoint.keep_last": "how many checkpoints are kept",
    "checkpoint.resume": "which checkpoint to resume",
    "eval.targets": "evaluation only",
    "eval.every_steps": "evaluation only",
    "eval.at_start": "evaluation only",
    "eval.batch_size": "evaluation only",
    "log.every_steps": "logging only",
    "log.tensorboard": "logging only",
    "log.progress_bar": "logging only",
    "aux.center_weight": "auxiliary losses may be added or tuned on resume (fine-tuning)",
    "aux.center_radius": "auxiliary losses may be added or tuned on resume (fine-tuning)",
    "aux.center_distance": "auxiliary losses may be added or tuned on resume (fine-tuning)",
    "aux.center_learnable": "auxiliary losses may be added or tuned on resume (fine-tuning)",
    "aux.triplet_weight": "auxiliary losses may be added or tuned on resume (fine-tuning)",
    "aux.triplet_margin": "auxiliary losses may be added or tuned on resume (fine-tuning)",
    "aux.triplet_mining": "auxiliary losses may be added or tuned on resume (fine-tuning)",
    "aux.triplet_distance": "auxiliary losses may be added or tuned on resume (fine-tuning)",
    "augment.crop_prob": "augmentation of the batches, not their order or the state",
    "augment.crop_min_scale": "augmentation of the batches, not their order or the state",
    "augment.lowres_prob": "augmentation of the batches, not their order or the state",
    "augment.lowres_min_side": "augmentation of the batches, not their order or the state",
    "augment.photometric_prob": "augmentation of the batches, not their order or the state",
    "augment.brightness": "augmentation of the batches, not their order or the state",
    "augment.contrast": "augmentation of the batches, not their order or the state",
    "augment.saturation": "augmentation of the batches, not their order or the state",
    "augment.erase_prob": "augmentation of the batches, not their order or the state",
    "augment.erase_fill": "augmentation of the batches, not their order or the state",
    "augment.erase_value": "augmentation of the batches, not their order or the state",
}


def _different(value: Any) -> Any:
    """A value of the same kind that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    if isinstance(value, dict):
        return {**value, "other": 1}
    if value is None:
        return 3
    raise AssertionError(f"no different value for {value!r}")


def _set(config: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(config))
    node = out
    *sections, field = key.split(".")
    for s in sections:
        node = node[s]
    node[field] = value
    return out


def _get(config: dict[str, Any], key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def test_every_config_field_is_changeable_or_refused() -> None:
    """Each field of the schema (:func:`configs.overrides.valid_keys` walks the
    dataclasses) has a declared resume policy (its own or its section's; default
    refuse): the changeable ones are exactly ``CHANGEABLE``, every refusal has a
    reason. Changed alone, each field is either taken (and reported as changed) or
    refused with that reason, never both and never silently."""
    base = config_to_dict(make_cfg("/tmp/x"))
    fields = valid_keys(Config)
    assert len(fields) == len(set(fields)) and len(fields) > 50
    policies = resume_policies(Config)
    assert list(policies) == fields
    declared = sorted(key for key, policy in policies.items() if policy.may_change)
    assert declared == sorted(CHANGEABLE), (
        f"declared changeable but not reviewed: {sorted(set(declared) - set(CHANGEABLE))}; "
        f"reviewed but not declared: {sorted(set(CHANGEABLE) - set(declared))}"
    )
    assert all(policy.why for policy in policies.values() if not policy.may_change)
    taken, refused = {}, {}
    for key in fields:
        current = _set(base, key, _different(_get(base, key)))
        changed, refusals = compare_configs(base, current)
        assert len(changed) + len(refusals) == 1, (key, changed, refusals)
        if changed:
            assert changed[0][0] == key
            taken[key] = changed[0]
        else:
            option, _, _, why = refusals[0]
            assert option == key and why == policies[key].why, refusals
            refused[key] = why
    assert sorted(taken) == sorted(CHANGEABLE), (
        f"taken but not reviewed: {sorted(set(taken) - set(CHANGEABLE))}; "
        f"reviewed but refused: {sorted(set(CHANGEABLE) - set(taken))}"
    )
    assert set(taken) | set(refused) == set(fields)
    # all the changeable ones at once: nothing refused
    everything = base
    for key in CHANGEABLE:
        everything = _set(everything, key, _different(_get(base, key)))
    changed, refusals = compare_configs(base, everything)
    assert refusals == [] and {c[0] for c in changed} == set(CHANGEABLE)


@pytest.mark.parametrize(
    "key",
    ["data.weights", "data.num_classes", "train.seed", "optimizer.name", "head.num_subcenters"],
)
def test_refusals_name_their_reason(key: str) -> None:
    """Options whose change would give the saved state another meaning are refused alone,
    with a reason of their own (not the catch-all for undeclared options)."""
    base = config_to_dict(make_cfg("/tmp/x"))
    other = _set(base, key, _different(_get(base, key)))
    changed, refused = compare_configs(base, other)
    assert changed == [] and [r[0] for r in refused] == [key]
    assert refused[0][3] and refused[0][3] != "a resumed run must keep it"


def test_the_comparison_sees_every_field() -> None:
    """compare_configs flattens one level (``section.field``); a deeper field of the
    schema would never be compared."""
    assert all(key.count(".") <= 1 for key in valid_keys(Config))


# ------------------------------------------------ checksums of every rank's files
SAVING = ("data.batch_size=4", "train.max_steps=4", "checkpoint.every_steps=2")


def _train_two_ranks(rank: int, world: int, out: str) -> dict:
    x, y = dataset()
    t = make_trainer(make_cfg(out, *SAVING), TensorLoader(x, y, 4, rank, world))
    t.fit()
    return {"weight": t.head.weight.detach().cpu().clone()}


def _scale_tensor_bytes(file: Path, tensor: torch.Tensor) -> None:
    """Replace ``tensor``'s stored bytes inside ``file`` with ``2 * tensor``: finite
    values, the same size, so only a checksum can tell."""
    data = bytearray(file.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0, "tensor bytes not found"
    data[at : at + len(raw)] = (2 * tensor).contiguous().numpy().tobytes()
    file.write_bytes(bytes(data))


def test_every_ranks_files_have_a_checksum_that_catches_finite_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    results = run_ranks(_train_two_ranks, 2, str(tmp_path))
    newest = tmp_path / "checkpoints" / "step-00000004"
    meta = json.loads((newest / "meta.json").read_text())
    assert set(meta["sha256"]) == set(meta["files"]) - {"meta.json"}
    for rank in (0, 1):
        assert f"head-{rank:05d}.pt" in meta["sha256"] and f"rank-{rank:05d}.pt" in meta["sha256"]
    _scale_tensor_bytes(newest / "head-00001.pt", results[1]["weight"])
    # a one-rank resume reads both shards (the damaged file has its size: the checkpoint
    # looks complete): the checksum names the damaged file, and auto falls back
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path, *SAVING), TensorLoader(x, y, 4, 0, 1))
    with caplog.at_level("WARNING", logger="trainer"):
        path = t.maybe_resume()
    assert "step-00000004/head-00001.pt fails its checksum" in caplog.text
    assert path == tmp_path / "checkpoints" / "step-00000002" and t.step == 2


# --------------------------------------------------- augmentation: each rank's own
SIDE = 16
AUGMENTED = ("data.batch_size=4", "augment.photometric_prob=1.0", "augment.erase_prob=1.0",
             "train.seed=7")  # fmt: skip


class _Recording:
    """The trainer's stepper, recording the micro-batches it is handed."""

    def __init__(self, stepper: Any) -> None:
        self.stepper = stepper
        self.seen: list[torch.Tensor] = []

    def __call__(self, micro_batches):
        self.seen.extend(images.detach().cpu().clone() for images, _ in micro_batches)
        return self.stepper(micro_batches)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stepper, name)


def _augmented_step(rank: int, world: int, out: str) -> dict:
    g = torch.Generator().manual_seed(5)
    images = torch.rand(32, 3, SIDE, SIDE, generator=g) * 2 - 1
    labels = torch.arange(32) % CLASSES
    cfg = make_cfg(out, *AUGMENTED)
    ctx = DistContext.current(device_under_test())
    torch.manual_seed(1)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, EMB))
    head = PartialFC(CLASSES, EMB, ArcFace(16.0, 0.3), seed=7, device=ctx.device)
    t = Trainer(cfg, backbone, head, TensorLoader(images, labels, 4, rank, world), ctx)
    recorder = _Recording(t.stepper)
    t.stepper = recorder
    same = images[:4]  # the same images on every rank
    t.train_step([(same, labels[:4])])
    t.train_step([(same, labels[:4]), (same, labels[:4])])  # step 1, micro-batches 0 and 1
    return {"seen": recorder.seen, "input": same, "rank": ctx.rank, "seed": cfg.train.seed}


def test_each_rank_augments_with_its_own_stream(tmp_path: Path) -> None:
    results = run_ranks(_augmented_step, 2, str(tmp_path))
    aug = BatchAugment.from_config(make_cfg(tmp_path, *AUGMENTED).augment)
    assert aug.enabled
    for got in results:
        expected = [
            aug(got["input"], 0, got["rank"], got["seed"], micro=0),
            aug(got["input"], 1, got["rank"], got["seed"], micro=0),
            aug(got["input"], 1, got["rank"], got["seed"], micro=1),
        ]
        assert len(got["seen"]) == 3
        for have, want in zip(got["seen"], expected, strict=True):
            assert torch.equal(have, want), got["rank"]
    # same images, different ranks: different augmentations
    assert not torch.equal(results[0]["seen"][0], results[1]["seen"][0])
