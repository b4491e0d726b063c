"""Checkpoints of a training run, in torchtitan's seams.

* :mod:`~trainer.checkpoint.storage`: checkpoint directories on disk (format 2),
  written atomically, each read once into a :class:`CheckpointDir`, checked against
  its checksums, listed in resume order;
* :mod:`~trainer.checkpoint.states`: the run's stateful parts (the ``Stateful``
  protocol) over the backbone, optimizers, schedulers, scaler, loader, RNG, head;
* :mod:`~trainer.checkpoint.resharding`: class-sharded state split by rank and merged
  by global class, so a run resumes on any number of ranks;
* :mod:`~trainer.checkpoint.policy`: the resume check (recorded facts, and the
  configuration by the policy each field declares in :mod:`configs.resume_policy`);
* :mod:`~trainer.checkpoint.manager`: :class:`CheckpointManager`, which saves and
  resumes (``auto`` fallback, ``keep_last``, lineages);
* :mod:`~trainer.checkpoint.files` and :mod:`~trainer.checkpoint.errors`: file IO
  with checksums, and what can go wrong.
"""

from trainer.checkpoint.errors import (
    CheckpointError,
    DamagedCheckpointError,
    NonFiniteStateError,
    UnusableCheckpointError,
)
from trainer.checkpoint.files import write_error
from trainer.checkpoint.manager import CheckpointManager, RunState
from trainer.checkpoint.policy import Fact, compare_configs
from trainer.checkpoint.resharding import reshard, shard_state, split_shard
from trainer.checkpoint.states import (
    Attributes,
    JsonDict,
    JsonList,
    ModuleState,
    OptimizerState,
    Recorded,
    RngState,
    ScalerState,
    SchedulerStates,
    ShardedModule,
    Stateful,
    nonfinite_parts,
)
from trainer.checkpoint.storage import FORMAT_VERSION, CheckpointDir, CheckpointStorage

__all__ = [
    "FORMAT_VERSION",
    "Attributes",
    "CheckpointDir",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointStorage",
    "DamagedCheckpointError",
    "Fact",
    "JsonDict",
    "JsonList",
    "ModuleState",
    "NonFiniteStateError",
    "OptimizerState",
    "Recorded",
    "RngState",
    "RunState",
    "ScalerState",
    "SchedulerStates",
    "ShardedModule",
    "Stateful",
    "UnusableCheckpointError",
    "compare_configs",
    "nonfinite_parts",
    "reshard",
    "shard_state",
    "split_shard",
    "write_error",
]
