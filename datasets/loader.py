"""The training loader: sampler + DataLoader workers + batched normalisation on the device.

Workers decode and flip to uint8 ``(B, 112, 112, 3)`` batches (a quarter of the bytes of
float32 to move between processes and to the GPU); the main process moves each batch to the
device (pinned memory and ``non_blocking`` on CUDA) and normalises it there. Usage::

    loader = FaceLoader(dataset, batch_size=128, seed=cfg.seed, device="cuda:0")
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:            # (B, 3, 112, 112) float32, (B,) int64
            ...
            ckpt["loader"] = loader.state_dict()  # position after the batches yielded
            loader.last_keys                      # sample keys of that batch (for logs)
    loader.load_state_dict(ckpt["loader"])        # resume mid-epoch, any world size

Bad data (:class:`datasets.errors.DataError`: a corrupt record, a bad label, too many
skipped samples) found in a worker process reaches the training process as the same
one-line ``DataError``, raised from the iteration: the worker hands it back as a batch
(:class:`FailedBatch`) instead of letting torch wrap it in a multi-line traceback.

Data files that change under a run: RecordIO ``.rec`` files and Arrow shards are
memory-mapped, and a read past the end of a file truncated during the run kills the
reading process with ``SIGBUS``. The loader records the size, modification time and
inode of every such file (:func:`data_files`) when it is built, checks them again at
every :meth:`FaceLoader.set_epoch` (and before every batch when it decodes in the
training process), and turns a worker killed by a bus error into a ``DataError`` naming
the files (:meth:`FaceLoader.explain_failure`): ``<file> changed during the run: size
X -> Y bytes``.
"""

from __future__ import annotations

import copy
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datasets.arrow_io import MANIFEST
from datasets.dataset import FaceDataset
from datasets.errors import DataError
from datasets.multi import ConcatFaceDataset, dataset_kind, dataset_table
from datasets.sampler import DistributedFaceSampler
from datasets.transforms import normalize_batch


def collate_uint8(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(uint8 (H, W, 3), label), ...]`` → ``(uint8 (B, H, W, 3), int64 (B,))``."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return images, labels


class FailedBatch:
    """What a worker returns instead of a batch when a sample raised :class:`DataError`.

    Pickled back to the training process with the exception (its message and
    ``path``/``key``/``offset``), where :class:`FaceLoader` raises it.
    """

    def __init__(self, error: DataError) -> None:
        self.error = error


class KeyedDataset(Dataset):
    """``dataset[item]`` plus the sample's key and index: ``(image, label, key, index)``.

    The key is :meth:`datasets.dataset.FaceDataset.sample_key` of the sampled index
    (the record key for RecordIO), so a batch can be traced back to its records; the
    index is that of the record actually decoded (:meth:`FaceDataset.fetch`: the next
    sound one when ``skip_corrupt`` replaced a corrupt record), by which per-record side
    data (:class:`RowLookup`) is looked up.
    """

    def __init__(self, dataset: FaceDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(
        self, item: int | tuple[int, int]
    ) -> tuple[torch.Tensor, int, int, int] | FailedBatch:
        index = int(item[0]) if isinstance(item, tuple) else int(item)
        try:
            image, label, decoded = self.dataset.fetch(item)
        except DataError as exc:
            return FailedBatch(exc)
        return image, label, self.dataset.sample_key(index), decoded


def collate_keyed(
    batch: list[tuple[torch.Tensor, int, int, int] | FailedBatch],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | FailedBatch:
    """:func:`collate_uint8` of ``(image, label, key, index)`` items, keys and indices
    as int64 ``(B,)``; the first :class:`FailedBatch` item if a sample failed."""
    for b in batch:
        if isinstance(b, FailedBatch):
            return b
    images, labels = collate_uint8([(b[0], b[1]) for b in batch])
    keys = torch.tensor([b[2] for b in batch], dtype=torch.int64)
    return images, labels, keys, torch.tensor([b[3] for b in batch], dtype=torch.int64)


class RowLookup(Protocol):
    """Per-record side data served with each batch (e.g.
    :class:`datasets.teacher_cache.TeacherCache`): ``(b, D)`` float32 rows of records
    ``indices``."""

    def lookup(self, indices: np.ndarray) -> np.ndarray: ...


def data_files(dataset: Any) -> list[Path]:
    """The files ``dataset`` reads while training, memory-mapped: a RecordIO ``.rec``
    with its ``.idx``, Arrow shards with their ``manifest.json``, those of every part of
    a :class:`datasets.multi.ConcatFaceDataset`. An image folder has none (each image is
    opened when read)."""

    if isinstance(dataset, ConcatFaceDataset):
        out: list[Path] = []
        for part in dataset.datasets:
            out += [f for f in data_files(part) if f not in out]
        return out
    kind = dataset_kind(dataset)
    if kind == "recordio":
        reader = dataset.reader
        return [Path(reader.uri), Path(reader.idx_path)]
    if kind == "arrow":
        return [*(Path(f) for f in dataset.files), Path(dataset.shard_dir) / MANIFEST]
    return []


FileStamp = tuple[int, int, int, int]
"""``(size, mtime_ns, device, inode)`` of a data file."""


def stamp_files(paths: list[Path]) -> dict[Path, FileStamp]:
    """The :data:`FileStamp` of each existing file of ``paths``."""
    stamps = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        stamps[path] = (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
    return stamps


def changed_files(stamps: dict[Path, FileStamp]) -> list[str]:
    """How each file of ``stamps`` differs from its stamp now, one phrase per changed
    file (``<file> changed during the run: size X -> Y bytes``); empty if none did."""
    out = []
    for path, (size, mtime, dev, ino) in stamps.items():
        try:
            st = os.stat(path)
        except OSError as exc:
            out.append(
                f"{path} changed during the run: it is gone ({exc.strerror or exc}; it had "
                f"{size} bytes)"
            )
            continue
        if st.st_size != size:
            what = f"size {size} -> {st.st_size} bytes"
        elif (st.st_dev, st.st_ino) != (dev, ino):
            what = f"replaced by another file of the same size ({size} bytes)"
        elif st.st_mtime_ns != mtime:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime_ns / 1e9))
            what = f"modified at {when} (size {size} bytes unchanged)"
        else:
            continue
        out.append(f"{path} changed during the run: {what}")
    return out


_WORKER_DIED = re.compile(r"DataLoader worker \(pid.*?\) (is killed by signal|exited unexpectedly)")


def _restore_default_sigbus() -> None:
    """In a loader worker: die of a bus error without torch's worker message (which
    blames shared memory); the training process names the data files instead
    (:meth:`FaceLoader.explain_failure`)."""
    if hasattr(signal, "SIGBUS"):
        signal.signal(signal.SIGBUS, signal.SIG_DFL)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per worker, RNGs seeded per worker,
    the default action for ``SIGBUS`` (see :meth:`FaceLoader.explain_failure`).

    OpenCV's thread count is deliberately not changed here: ``cv2.setNumThreads`` in a
    forked child whose parent already ran a parallel OpenCV call deadlocks.
    """
    _restore_default_sigbus()
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id, set by the DataLoader
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- third-party code in workers may use it
    info = torch.utils.data.get_worker_info()
    dataset = getattr(info, "dataset", None)
    if isinstance(dataset, KeyedDataset):
        dataset = dataset.dataset
    if isinstance(dataset, FaceDataset):
        dataset.seed_worker(seed)


class FaceLoader:
    """Distributed, resumable loader yielding normalised batches on ``device``.

    Args:
        dataset: any :class:`datasets.dataset.FaceDataset` (its ``output`` is overridden).
        batch_size: per-rank batch size.
        rank, world_size: default to the process group (else 0 / 1).
        seed: shuffle seed, identical on all ranks.
        num_workers: decoding processes (0 decodes in the main process).
        device: where batches are delivered; pinned memory is used when it is CUDA.
        drop_last, shuffle: see :class:`datasets.sampler.DistributedFaceSampler`.
        prefetch_factor: batches each worker keeps ready.
        sampler: replaces the default :class:`DistributedFaceSampler` (e.g. a
            :class:`datasets.pk_sampler.PKSampler`); it yields ``(index, aug_seed)``
            items in whole batches of ``batch_size`` and has ``rank``, ``set_epoch``,
            ``state_dict(batches_done)``, ``load_state_dict`` and ``mark_epoch_done``.
        targets: per-record rows served with each batch (a teacher's cached
            embeddings), or ``None``.

    Batches are ``(images, labels)``, or ``(images, labels, targets)`` with
    ``targets`` (its ``(B, D)`` float32 rows of the batch's records, on ``device``);
    after each one, :attr:`last_keys` holds its
    samples' keys (int64 ``(B,)``, see :class:`KeyedDataset`), which the trainer logs
    when a step has to be skipped.
    """

    def __init__(
        self,
        dataset: FaceDataset,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        num_workers: int = 2,
        device: str | torch.device = "cpu",
        drop_last: bool = True,
        shuffle: bool = True,
        prefetch_factor: int = 4,
        sampler: Any = None,
        targets: RowLookup | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.targets = targets
        self.dataset = copy.copy(dataset)
        self.dataset.output = "uint8"
        if getattr(self.dataset, "skip_corrupt", False):
            self.dataset.share_skip_marks()  # one cap for all workers of this rank
        self.sampler = sampler or DistributedFaceSampler(
            len(dataset), batch_size, rank, world_size, seed, shuffle=shuffle, drop_last=drop_last
        )
        self.batch_size = batch_size
        self._batches_done = 0
        self.last_keys: torch.Tensor | None = None
        self.in_process = num_workers == 0
        # the data files as they are now: checked at every epoch (see check_files)
        self.file_stamps = stamp_files(data_files(dataset))
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs = {
                "prefetch_factor": prefetch_factor,
                "persistent_workers": True,
                "worker_init_fn": seed_worker,
            }
        generator = torch.Generator()
        generator.manual_seed(seed * 7919 + self.sampler.rank)
        self.loader = DataLoader(
            KeyedDataset(self.dataset),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_keyed,
            pin_memory=self.device.type == "cuda",
            drop_last=False,  # the sampler already yields whole batches only
            generator=generator,
            **kwargs,
        )

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def dataset_table(self) -> list[dict[str, Any]]:
        """The datasets trained on, with their label and image offsets
        (:func:`datasets.multi.dataset_table`; one entry for a single dataset)."""

        return dataset_table(self.dataset)

    def check_files(self) -> None:
        """Raise :class:`DataError` naming the data files that changed (size,
        modification time or inode) since the loader was built."""
        changed = changed_files(self.file_stamps)
        if changed:
            raise DataError(
                "; ".join(changed) + " (training data must not change while a run reads "
                "it: restore it, then resume)",
                path=changed[0].split(" changed during the run")[0],
            )

    def explain_failure(self, exc: BaseException) -> DataError | None:
        """A :class:`DataError` for a loader worker that died (``DataLoader worker (pid
        N) is killed by signal: Bus error``, ``... exited unexpectedly``): naming the data
        files that changed, or for a bus error with none changed, the memory-mapped files
        it reads. ``None`` for any other error."""
        text = str(exc)
        if not _WORKER_DIED.search(text):
            return None
        first = text.strip().splitlines()[0].strip()
        changed = changed_files(self.file_stamps)
        if changed:
            return DataError(
                "; ".join(changed) + f" (a loader worker died reading it: {first}); training "
                "data must not change while a run reads it: restore it, then resume",
                path=changed[0].split(" changed during the run")[0],
            )
        if "Bus error" in text:
            files = ", ".join(str(f) for f in self.file_stamps) or "its data files"
            return DataError(
                f"a loader worker was killed by a bus error (SIGBUS) reading the "
                f"memory-mapped data {files}: a file truncated or rewritten during the run, "
                "a failing disk, or too little shared memory (/dev/shm) for the workers",
                path=next(iter(self.file_stamps), None),
            )
        return None

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (resumes within the epoch loaded by load_state_dict).

        Raises :class:`DataError` if a data file changed since the loader was built
        (:meth:`check_files`)."""
        self.check_files()
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches the next iteration yields on this rank."""
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self._batches_done = 0
        non_blocking = self.device.type == "cuda"
        batches = iter(self.loader)
        while True:
            if self.in_process:  # a truncated mapped file would kill this very process
                self.check_files()
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError as exc:
                failure = self.explain_failure(exc)
                if failure is None:
                    raise
                raise failure from None
            if isinstance(batch, FailedBatch):
                # the one-line DataError of the worker, not torch's wrapped traceback
                raise batch.error
            images, labels, keys, indices = batch
            images = normalize_batch(images.to(self.device, non_blocking=non_blocking))
            labels = labels.to(self.device, non_blocking=non_blocking)
            self._batches_done += 1
            self.last_keys = keys
            if self.targets is None:
                yield images, labels
            else:  # rows copied out of the memory map: (B, D), never the whole table
                rows = torch.from_numpy(self.targets.lookup(indices.numpy()))
                yield images, labels, rows.to(self.device, non_blocking=non_blocking)
        # the epoch is finished: a checkpoint taken now resumes at the next epoch
        self.sampler.mark_epoch_done()

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches yielded so far in the current iteration."""
        return self.sampler.state_dict(batches_done=self._batches_done)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._batches_done = 0
