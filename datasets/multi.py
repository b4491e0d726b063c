"""Several training datasets as one: concatenated label spaces and optional sampling weights.

``data.root=[A, B, ...]`` trains on every listed dataset (RecordIO, Arrow shards and image
folders may be mixed) as if they were one:

* **labels** are concatenated in list order: dataset ``i``'s label ``y`` becomes
  ``class_offset[i] + y`` with ``class_offset[i] = num_classes[0] + ... + num_classes[i-1]``;
  images likewise: dataset ``i``'s sample ``j`` is global index ``image_offset[i] + j``.
  :meth:`ConcatFaceDataset.table` lists, per dataset, its name, path, kind, class and image
  counts and both offsets; the trainer records it in every checkpoint's ``meta.json`` and
  refuses a resume whose list would give the labels other meanings
  (:func:`resume_problem`);
* **sampling**: without weights every image is drawn once per epoch, exactly as from one
  concatenated dataset (:class:`datasets.sampler.DistributedFaceSampler` over the global
  indices). With weights ``w``, :class:`WeightedDatasetSampler` keeps the epoch at
  ``N = sum(num_images)`` samples and gives dataset ``i`` exactly ``n_i`` of them, the
  largest-remainder rounding of ``N * w_i / sum(w)`` (:func:`apportion`): each of its images
  is drawn ``n_i // N_i`` times, plus a seeded random subset of ``n_i % N_i`` images once
  more (:func:`epoch_pool`); the ``N`` draws are then shuffled as one epoch. The order is a
  function of ``(seed, epoch)`` only, the same for every world size, and resumable
  mid-epoch like the single-dataset sampler.

Mixing datasets whose images differ in size is refused (naming both): the loader would
resize one of them silently and the faces would no longer be aligned alike. So is the
same dataset listed twice, however it is reached (``DATA`` and ``DATA/train.rec``, a
symlink, a relative path, a hard link): datasets are identified by the device and inode
of their data file (:func:`dataset_identity`), not by the text of their paths.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.arrow_io import ArrowDataset
from datasets.dataset import FaceDataset, ImageFolderDataset, RecordIODataset
from datasets.discovery import open_dataset
from datasets.errors import DataError, LabelRangeError
from datasets.sampler import DistributedFaceSampler
from datasets.transforms import decode_bgr

__all__ = [
    "KEY_STRIDE",
    "ConcatFaceDataset",
    "WeightedDatasetSampler",
    "apportion",
    "dataset_identity",
    "dataset_kind",
    "dataset_name",
    "dataset_table",
    "epoch_pool",
    "open_datasets",
    "resume_problem",
]

#: Sample keys of dataset ``i`` are ``i * KEY_STRIDE + its own key`` (its RecordIO key or
#: index), so a logged key reads as "dataset i, key k" in decimal (RecordIO keys are below
#: 2**32 < 10**12).
KEY_STRIDE = 10**12

#: Leading samples tried when reading a dataset's image size (the first decodable one counts).
_SIZE_PROBES = 8


def dataset_name(path: str | os.PathLike) -> str:
    """A dataset's name: the last component of its path, a ``train.rec`` file being named
    by its directory (``/data/ms1m`` and ``/data/ms1m/train.rec`` are both ``ms1m``)."""
    p = Path(path)
    if p.name == "train.rec":
        return p.parent.name
    return p.name


def dataset_kind(dataset: FaceDataset) -> str:
    """``recordio``, ``arrow``, ``folder`` or the class name of anything else."""

    if isinstance(dataset, RecordIODataset):
        return "recordio"
    if isinstance(dataset, ArrowDataset):
        return "arrow"
    if isinstance(dataset, ImageFolderDataset):
        return "folder"
    return type(dataset).__name__


def _source_path(dataset: FaceDataset) -> str:
    """Where a single dataset was opened from (its ``.rec``, shard or image directory)."""
    for attr in ("shard_dir", "root"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return str(value)
    reader = getattr(dataset, "reader", None)
    if reader is not None:
        return str(reader.uri)
    return ""


def image_size(dataset: FaceDataset) -> tuple[int, int]:
    """``(height, width)`` of the dataset's first decodable image (one of its first 8).

    Raises the first sample's :class:`DataError` if none of them decodes."""
    first: DataError | None = None
    for i in range(min(len(dataset), _SIZE_PROBES)):
        try:
            payload = dataset._load(i)[0]
        except DataError as exc:
            first = first or exc
            continue
        img = decode_bgr(payload, None)
        if img is not None:
            return int(img.shape[0]), int(img.shape[1])
        if first is None:
            first = DataError(
                f"{dataset._where(i)}: OpenCV cannot decode the image", **dataset._location(i)
            )
    assert first is not None  # a dataset holds at least one sample
    raise first


class ConcatFaceDataset(FaceDataset):
    """Several :class:`~datasets.dataset.FaceDataset` as one, labels concatenated.

    Args:
        datasets: the parts, in order (at least one).
        paths: where each was opened from (for the table and messages); default: read
            from each dataset.
        option: how messages name the list (``data.root`` in the trainer).
        check_image_size: refuse parts whose images differ in size (decodes one image each).
        kwargs: :class:`FaceDataset` options (``flip``, ``output``, ``skip_corrupt``,
            ``max_skipped_fraction``, ``image_size``); the parts' own options are not used,
            this dataset decodes, flips, skips and checks labels itself.

    ``self[(i, aug_seed)]`` is ``(image, class_offset[d] + label)`` of sample
    ``i - image_offset[d]`` of part ``d``; a label outside the part's own
    ``[0, num_classes)`` raises :class:`~datasets.errors.LabelRangeError` naming the part's
    file, as it would alone (never hidden by the shift).
    """

    def __init__(
        self,
        datasets: Sequence[FaceDataset],
        paths: Sequence[str | os.PathLike] | None = None,
        option: str = "root",
        check_image_size: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not datasets:
            raise ValueError(f"{option}: needs at least one dataset")
        self.datasets = list(datasets)
        if paths is None:
            paths = [_source_path(d) for d in self.datasets]
        if len(paths) != len(self.datasets):
            raise ValueError(f"{len(paths)} paths given for {len(self.datasets)} datasets")
        self.paths = [str(p) for p in paths]
        self.option = option
        sizes = [len(d) for d in self.datasets]
        classes = [int(d.num_classes) for d in self.datasets]
        # offsets[i] = sum of the counts before i; the last entry is the total
        self.image_offsets = [0, *np.cumsum(sizes).tolist()]
        self.class_offsets = [0, *np.cumsum(classes).tolist()]
        self.num_classes = int(self.class_offsets[-1])
        self._len = int(self.image_offsets[-1])
        if check_image_size and len(self.datasets) > 1:
            self._check_image_sizes()

    def _name(self, i: int) -> str:
        return f"{self.option}[{i}] ({self.paths[i]})"

    def _check_image_sizes(self) -> None:
        first = image_size(self.datasets[0])
        for i, d in enumerate(self.datasets[1:], start=1):
            size = image_size(d)
            if size != first:
                raise DataError(
                    f"{self._name(i)} holds {size[0]}x{size[1]} images but {self._name(0)} "
                    f"holds {first[0]}x{first[1]}: datasets of different image sizes cannot be "
                    "trained together (their faces are not aligned alike); convert one to "
                    "the other's size",
                    path=self.paths[i],
                )

    def __len__(self) -> int:
        return self._len

    @property
    def sizes(self) -> list[int]:
        """Image count of each part."""
        return [len(d) for d in self.datasets]

    def locate(self, index: int) -> tuple[int, int]:
        """``(part, index within the part)`` of global sample ``index``."""
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} outside [0, {self._len})")
        part = bisect.bisect_right(self.image_offsets, index) - 1
        return part, index - self.image_offsets[part]

    def _load(self, index: int) -> tuple[bytes | memoryview, int, str | None]:
        part, local = self.locate(index)
        d = self.datasets[part]
        payload, label, where = d._load(local)
        if not 0 <= label < d.num_classes:
            raise LabelRangeError(
                f"{where or d._where(local)}: label {label} is outside [0, num_classes="
                f"{d.num_classes}) of {self._name(part)}",
                **d._location(local),
            )
        return payload, label + self.class_offsets[part], where or d._where(local)

    def labels(self) -> np.ndarray:
        """Every sample's label (see :meth:`FaceDataset.labels`): each part's own labels,
        shifted by its class offset."""
        parts = [
            d.labels() + offset
            for d, offset in zip(self.datasets, self.class_offsets, strict=False)
        ]
        return np.concatenate(parts).astype(np.int64, copy=False)

    def _where(self, index: int) -> str:
        part, local = self.locate(index)
        return self.datasets[part]._where(local)

    def _location(self, index: int) -> dict[str, Any]:
        part, local = self.locate(index)
        return self.datasets[part]._location(local)

    def sample_key(self, index: int) -> int:
        """``part * KEY_STRIDE + the part's own key`` (see :data:`KEY_STRIDE`)."""
        part, local = self.locate(index)
        return part * KEY_STRIDE + self.datasets[part].sample_key(local)

    def table(self) -> list[dict[str, Any]]:
        """Per part: ``name``, ``path``, ``kind``, ``num_classes``, ``num_images``,
        ``class_offset``, ``image_offset`` (JSON-able; what checkpoints record)."""
        return [
            {
                "name": dataset_name(path),
                "path": path,
                "kind": dataset_kind(d),
                "num_classes": int(d.num_classes),
                "num_images": len(d),
                "class_offset": int(self.class_offsets[i]),
                "image_offset": int(self.image_offsets[i]),
            }
            for i, (d, path) in enumerate(zip(self.datasets, self.paths, strict=True))
        ]


def dataset_table(dataset: FaceDataset) -> list[dict[str, Any]]:
    """:meth:`ConcatFaceDataset.table`, or the one-entry table of a single dataset."""
    if isinstance(dataset, ConcatFaceDataset):
        return dataset.table()
    path = _source_path(dataset)
    return [
        {
            "name": dataset_name(path) if path else "",
            "path": path,
            "kind": dataset_kind(dataset),
            "num_classes": int(dataset.num_classes),
            "num_images": len(dataset),
            "class_offset": 0,
            "image_offset": 0,
        }
    ]


def data_file(root: str | os.PathLike) -> Path:
    """The file that identifies the training data at ``root``: a ``.rec`` file itself,
    a directory's ``train.rec``, an Arrow directory's ``manifest.json``; an image folder
    (or anything else) is its directory."""
    path = Path(root)
    if path.is_dir():
        for name in ("train.rec", "manifest.json"):
            if (path / name).is_file():
                return path / name
    return path


def dataset_identity(root: str | os.PathLike) -> tuple[int, int] | None:
    """``(device, inode)`` of :func:`data_file` of ``root`` (symlinks followed), the
    same however the data is reached; ``None`` if it cannot be read."""
    try:
        st = os.stat(data_file(root))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_distinct(roots: Sequence[str | os.PathLike], option: str = "root") -> None:
    """Refuse the same dataset listed twice (:func:`dataset_identity`): its identities
    would count twice, as other classes. The :class:`DataError` names both entries."""
    seen: dict[tuple[int, int], int] = {}
    for i, root in enumerate(roots):
        identity = dataset_identity(root)
        if identity is None:
            continue
        if identity in seen:
            j = seen[identity]
            first, again = data_file(roots[j]), data_file(root)
            same = (
                f"both read {first.resolve()}"
                if first.resolve() == again.resolve()
                else f"{again} is {first}: device {identity[0]}, inode {identity[1]}"
            )
            raise DataError(
                f"{option}[{i}] ({str(root)!r}) and {option}[{j}] ({str(roots[j])!r}) are the "
                f"same dataset ({same}): its identities would count twice, as other classes; "
                "list it once",
                path=root,
            )
        seen[identity] = i


def open_datasets(
    roots: Sequence[str | os.PathLike], option: str = "root", **kwargs: Any
) -> FaceDataset:
    """Open every root (:func:`datasets.discovery.open_dataset` chooses each one's kind).

    One root gives that dataset itself (``kwargs`` go to it, as to ``open_dataset``);
    several give a :class:`ConcatFaceDataset` (``kwargs`` other than ``num_classes`` go to
    it; a ``num_classes`` is the total and is checked by the caller). Every problem with a
    root raises :class:`DataError` naming ``option[i]`` and the path: one that does not
    exist, is of no known kind, or holds bad data; two roots of different image sizes;
    and one dataset listed twice (:func:`check_distinct`, by device and inode).
    """
    if not roots:
        raise ValueError(f"{option}: no training data given")
    if len(roots) == 1:
        return _open_one(roots[0], option, None, **kwargs)
    check_distinct(roots, option)
    kwargs.pop("num_classes", None)
    parts = [_open_one(root, option, i, flip=False) for i, root in enumerate(roots)]
    return ConcatFaceDataset(parts, [str(r) for r in roots], option=option, **kwargs)


def _open_one(
    root: str | os.PathLike, option: str, index: int | None, **kwargs: Any
) -> FaceDataset:
    name = option if index is None else f"{option}[{index}]"
    path = Path(root)
    if not path.exists():
        raise DataError(f"{name}: {str(path)!r} does not exist", path=path)
    if index is None:
        return open_dataset(path, **kwargs)
    try:
        return open_dataset(path, **kwargs)
    except DataError as exc:
        raise type(exc)(f"{name}: {exc}", path=exc.path, key=exc.key, offset=exc.offset) from None
    except FileNotFoundError as exc:  # e.g. a directory with no images: no known kind
        raise DataError(
            f"{name}: {path} is training data of no known kind (no train.rec, no *.arrow "
            f"shards, and as an image folder: {exc})",
            path=path,
        ) from None


# ----------------------------------------------------------------------------- sampling


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder).

    Each share is ``floor(total * w_i / sum(w))``; the units left over go one each to the
    largest remainders, ties to the lower index. Exact (rational arithmetic), so the
    result is the same on every machine. ``weights`` must be finite and positive.
    """
    if not weights or any(not (math.isfinite(w) and w > 0) for w in weights):
        raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
    exact = [Fraction(w) for w in weights]
    whole = sum(exact)
    quotas = [total * w / whole for w in exact]
    shares = [math.floor(q) for q in quotas]
    left = total - sum(shares)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in order[:left]:
        shares[i] += 1
    return shares


def _subset_seed(seed: int, epoch: int, part: int) -> int:
    """A 63-bit seed for part ``part``'s extra draws in ``epoch`` (apart from the
    shuffle's ``seed * 1_000_003 + epoch``)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, part, 0x6D756C74]).generate_state(
        2, np.uint32
    )
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def epoch_pool(
    sizes: Sequence[int], counts: Sequence[int], seed: int, epoch: int, shuffle: bool = True
) -> torch.Tensor:
    """The global indices an epoch draws, grouped by part: int64 ``(sum(counts),)``.

    Part ``i`` (``sizes[i]`` images from global index ``sum(sizes[:i])``) contributes
    ``counts[i]`` indices: every one of its images ``counts[i] // sizes[i]`` times, then
    ``counts[i] % sizes[i]`` distinct images once more, the first ones of a permutation
    seeded by ``(seed, epoch, i)`` (of ``range(sizes[i])`` itself when not ``shuffle``).
    """
    pieces = []
    start = 0
    for part, (size, count) in enumerate(zip(sizes, counts, strict=True)):
        whole, extra = divmod(int(count), int(size))
        if whole:
            pieces.append(torch.arange(start, start + size).repeat(whole))
        if extra:
            if shuffle:
                g = torch.Generator()
                g.manual_seed(_subset_seed(seed, epoch, part))
                pieces.append(torch.randperm(size, generator=g)[:extra] + start)
            else:
                pieces.append(torch.arange(start, start + extra))
        start += int(size)
    if not pieces:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(pieces)


class WeightedDatasetSampler(DistributedFaceSampler):
    """:class:`DistributedFaceSampler` over several datasets drawn in given proportions.

    Args:
        sizes: image count of each dataset (global indices follow in this order).
        weights: one per dataset, finite and > 0: dataset ``i`` gives exactly
            ``apportion(sum(sizes), weights)[i]`` of each epoch's ``sum(sizes)`` samples.
        batch_size, rank, world_size, seed, shuffle, drop_last: as
            :class:`DistributedFaceSampler`.

    The epoch's order is ``epoch_pool(...)[permutation]`` with the single-dataset
    sampler's permutation of ``range(sum(sizes))``: the same global batches for every
    world size, the position one number, resumable mid-epoch at any world size.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if len(sizes) != len(weights):
            raise ValueError(f"{len(weights)} weights given for {len(sizes)} datasets")
        if any(int(s) <= 0 for s in sizes):
            raise ValueError(f"every dataset must hold images, sizes {list(sizes)}")
        total = sum(int(s) for s in sizes)
        super().__init__(total, batch_size, rank, world_size, seed, shuffle, drop_last)
        self.sizes = [int(s) for s in sizes]
        self.weights = [float(w) for w in weights]
        self.counts = apportion(self.num_samples, self.weights)

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's global order: int64 ``(num_samples,)`` global dataset indices."""
        epoch = self.epoch if epoch is None else epoch
        pool = epoch_pool(self.sizes, self.counts, self.seed, epoch, self.shuffle)
        return pool[super().permutation(epoch)]

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        return {**super().state_dict(batches_done), "sizes": self.sizes, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As :meth:`DistributedFaceSampler.load_state_dict`; the datasets' sizes and the
        weights must be the saver's (the epoch's order is drawn from them)."""
        saved = (list(state.get("sizes", [])), [float(w) for w in state.get("weights", [])])
        if saved != (self.sizes, self.weights):
            raise ValueError(
                f"sampler state is for dataset sizes {saved[0]} with weights {saved[1]}, this "
                f"sampler has {self.sizes} with {self.weights}"
            )
        super().load_state_dict(state)


# ----------------------------------------------------------------------------- resuming


def _describe(table: Sequence[dict[str, Any]]) -> str:
    return ", ".join(
        f"[{i}] {e.get('name', '?')} ({e.get('num_classes')} classes from label "
        f"{e.get('class_offset')}, {e.get('num_images')} images)"
        for i, e in enumerate(table)
    )


def resume_problem(
    saved: Sequence[dict[str, Any]] | None, current: Sequence[dict[str, Any]]
) -> str | None:
    """Why a checkpoint trained on the datasets ``saved`` (its recorded table, ``None``
    if it has none) cannot resume on ``current``; ``None`` if it can.

    Labels mean ``class_offset + label`` of a part, so several datasets must stay the
    same list in the same order: the same names, class and image counts. Only where they
    live may change (the paths are not compared). One dataset keeps the single-dataset
    rule: it may change freely (``data.num_classes``/``data.num_images`` are checked on
    their own). A checkpoint without a table was trained on one dataset.
    """
    saved_list = list(saved) if saved is not None else None
    if saved_list is None:
        if len(current) <= 1:
            return None
        return (
            f"the checkpoint was trained on one dataset (it records no dataset list), now "
            f"{len(current)}: {_describe(current)}"
        )
    if len(saved_list) <= 1 and len(current) <= 1:
        return None
    keys = ("name", "num_classes", "num_images")
    same = len(saved_list) == len(current) and all(
        all(a.get(k) == b.get(k) for k in keys) for a, b in zip(saved_list, current, strict=True)
    )
    if same:
        return None
    return (
        f"the checkpoint was trained on {_describe(saved_list)}; now {_describe(current)}. "
        "Labels of several datasets are concatenated in list order, so the list, its order "
        "and each dataset's name and size must stay as they were (only their directories "
        "may move)"
    )
