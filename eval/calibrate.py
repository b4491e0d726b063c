"""Calibrated thresholds: the cosine at which a model's impostor pairs reach a FAR.

::

    python -m eval.calibrate --model M.onnx --bin mine.bin --far 1e-3 1e-4
    python -m eval.calibrate --model backbone.pt --network r50 --bin mine.bin

The ``.bin``'s pairs (LFW format: ``eval.make_bin`` writes one from your own people)
are embedded as ``eval.compare`` embeds photos (flip-test, L2-normalised); a pair's
score is the cosine similarity of its two embeddings, and two faces are the same person
when their score is **above** the threshold.

For a target false-accept rate ``far`` over ``n`` impostor pairs, at most
``k = floor(far * n)`` impostor pairs may score above the threshold: the threshold is
the ``(k + 1)``-th highest impostor score, the lowest impostor score whose measured FAR
is at most the target (:func:`threshold_at_far`; the conservative end of the gap below
it, where a threshold would fit these impostor pairs more closely). The measured FAR
and TAR at that threshold are reported apart from the target. A target below ``10 / n``
rests on fewer than 10 impostor pairs above it: the calibration says so
(``"few_impostors": true``) and warns.

The result goes to the sidecar ``<model>.calibration.json`` (:func:`sidecar_path`),
written atomically: the model file's SHA-256, the ``.bin`` (path, SHA-256) and one entry
per target FAR (threshold, measured FAR and TAR, pair counts).

With ``--into-model`` (an ONNX file exported by this project, recognised by its
:data:`~eval.onnx_options.OUR_EXPORT_KEY` metadata entry) the same record goes into the
model's own ``metadata_props`` under the key :data:`METADATA_KEY` (``calibration``, JSON),
the file rewritten atomically; a calibration already there is replaced. Writing it
changes the file's bytes, so the record's ``model_sha256`` is then the **graph hash**
(:func:`model_graph_sha256`): the SHA-256 of the model serialised
(``SerializeToString(deterministic=True)``) with its ``calibration`` metadata entry
removed, and ``"model_hash": "onnx-without-calibration"`` says so. The sidecar is the
default, for every model, as before.

``eval.compare`` and ``eval.search`` read a calibration by default
(:func:`read_calibration`): the model's metadata first, else the sidecar, and say which
(:func:`calibration_source`). One whose hash is not the model's is refused, naming both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.atomic import atomic_path, write_json
from common.cli import run_main
from common.digest import sha256_file
from common.errors import UserError
from eval.jsonio import printable
from eval.onnx_options import OUR_EXPORT_KEY, add_input_arguments, input_options

#: The target FARs calibrated by default.
DEFAULT_FARS = (1e-3, 1e-4)
#: A FAR is measured on enough impostor pairs when at least this many lie above it.
MIN_IMPOSTORS_ABOVE = 10
#: ``"format"`` of the sidecar file.
FORMAT = "eval.calibrate/1"
#: The ONNX ``metadata_props`` key of a calibration written with ``--into-model``.
METADATA_KEY = "calibration"
#: ``"model_hash"`` of a record whose ``model_sha256`` is :func:`model_graph_sha256`'s.
GRAPH_HASH = "onnx-without-calibration"


class CalibrationError(UserError, ValueError):
    """A calibration that cannot be made or used: no impostor pairs, a sidecar that is
    not valid, or one made for another model file (names both hashes)."""


def sidecar_path(model: str | os.PathLike[str]) -> str:
    """The calibration file of ``model``: ``<model>.calibration.json`` next to it (a
    model folder's sits beside the folder)."""
    return os.fspath(model).rstrip("/\\") + ".calibration.json"


def model_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a model file's bytes; of a model folder (``eval.export``), of its files'
    relative names and bytes in sorted order (calibrations left out)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                if not name.endswith(".calibration.json"):
                    full = os.path.join(root, name)
                    h.update(os.path.relpath(full, path).encode() + b"\0")
                    h.update(sha256_file(full).encode())
        return h.hexdigest()
    return sha256_file(path)


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """The lowest cosine threshold at which at most ``floor(far * n)`` of the ``n``
    impostor scores lie above it (``score > threshold``): the ``(k + 1)``-th highest."""
    scores = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise CalibrationError("no impostor pairs to calibrate a FAR on")
    k = math.floor(far * scores.size)
    return float(scores[k]) if k < scores.size else -1.0


def calibrate_scores(
    scores: np.ndarray, same: np.ndarray, fars: Sequence[float]
) -> list[dict[str, Any]]:
    """One entry per target FAR: ``far_target``, ``threshold``, the measured ``far`` and
    ``tar`` (None without genuine pairs), the counts and ``few_impostors``."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    impostor, genuine = scores[~same], scores[same]
    out = []
    for far in fars:
        t = threshold_at_far(impostor, far)
        accepted = int((impostor > t).sum())
        out.append(
            {
                "far_target": float(far),
                "threshold": t,
                "far": accepted / impostor.size,
                "false_accepts": accepted,
                "tar": float((genuine > t).mean()) if genuine.size else None,
                "genuine": int(genuine.size),
                "impostor": int(impostor.size),
                "few_impostors": bool(impostor.size * far < MIN_IMPOSTORS_ABOVE),
            }
        )
    return out


def describe_entry(e: dict[str, Any]) -> str:
    """One report line: the target FAR and the measured one, apart."""
    tar = "n/a" if e["tar"] is None else f"{e['tar']:.4f}"
    line = (
        f"target FAR {e['far_target']:g}: threshold {e['threshold']:.4f} (cosine); measured "
        f"FAR {e['far']:.6f} ({e['false_accepts']} of {e['impostor']} impostor pairs), "
        f"TAR {tar} ({e['genuine']} genuine pairs)"
    )
    if e["few_impostors"]:
        need = math.ceil(MIN_IMPOSTORS_ABOVE / e["far_target"])
        line += (
            f"; warning: rests on too few impostor pairs ({e['impostor']} < "
            f"{MIN_IMPOSTORS_ABOVE}/FAR = {need}), the measured FAR is not reliable"
        )
    return line


def _load_onnx(model: str | os.PathLike[str]) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (its weights included); a file onnx cannot
    parse is a :class:`CalibrationError` naming it."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(os.fspath(model))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CalibrationError(f"{os.fspath(model)}: not an ONNX model ({exc})") from None


def _without_calibration(proto: Any) -> Any:
    """``proto`` with its :data:`METADATA_KEY` metadata entries removed (in place)."""
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key != METADATA_KEY]
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def model_graph_sha256(proto: Any) -> str:
    """The graph hash of an ONNX model (an ``onnx.ModelProto``): hex SHA-256 of
    ``SerializeToString(deterministic=True)`` of a copy without its :data:`METADATA_KEY`
    metadata entry, so that writing a calibration into the model does not change it."""
    copy = type(proto)()
    copy.CopyFrom(proto)
    return hashlib.sha256(
        _without_calibration(copy).SerializeToString(deterministic=True)
    ).hexdigest()


def is_our_onnx(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` is an ONNX file exported by this project (its metadata has
    :data:`~eval.onnx_options.OUR_EXPORT_KEY`)."""
    if not (os.path.isfile(model) and os.fspath(model).lower().endswith(".onnx")):
        return False
    try:
        return any(e.key == OUR_EXPORT_KEY for e in _load_onnx(model).metadata_props)
    except CalibrationError:
        return False


def _check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a valid calibration, else a :class:`CalibrationError`."""
    try:
        entries = record["entries"]
        if not isinstance(record["model_sha256"], str):
            raise TypeError("model_sha256")
        if record.get("format") != FORMAT or not entries:
            raise KeyError("format")
        for e in entries:
            if not 0 < float(e["far_target"]) < 1 or not math.isfinite(float(e["threshold"])):
                raise ValueError(f"entry {e!r:.80}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{where}: not a calibration ({exc})") from None
    return record


def _metadata_calibration(model: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The calibration in an ONNX model's metadata (checked against its graph hash), or
    None when the file is not an ONNX model onnx can parse, or has none."""
    if not (os.path.isfile(model) and os.fspath(model).lower().endswith(".onnx")):
        return None
    try:
        proto = _load_onnx(model)
    except CalibrationError:  # not parseable: the model's loader says why, if it is used
        return None
    text = next((e.value for e in proto.metadata_props if e.key == METADATA_KEY), None)
    if text is None:
        return None
    where = f"{os.fspath(model)} (metadata {METADATA_KEY!r})"
    try:
        record = _check_record(json.loads(text), where)
    except ValueError as exc:
        raise CalibrationError(f"{where}: not a calibration ({exc})") from None
    if record.get("model_hash") != GRAPH_HASH:
        raise CalibrationError(f"{where}: not a calibration (model_hash {GRAPH_HASH!r} expected)")
    wanted, actual = record["model_sha256"], model_graph_sha256(proto)
    if actual != wanted:
        raise CalibrationError(
            f"{where} was made for a model whose graph SHA-256 (without its calibration) is "
            f"{wanted}, but {os.fspath(model)}'s is {actual}: the model was changed after "
            "calibrating; recalibrate with python -m eval.calibrate --into-model"
        )
    record["path"] = os.fspath(model)
    record["source"] = "metadata"
    return record


def calibration_source(record: dict[str, Any]) -> str:
    """Where a record of :func:`read_calibration` comes from, in words."""
    if record.get("source") == "metadata":
        return f"in the metadata of {printable(record['path'])}"
    return printable(record["path"])


def read_calibration(model: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``model``'s calibration, or None when there is none: the one in an ONNX model's
    metadata (:data:`METADATA_KEY`) first, else the sidecar; ``"path"`` (the model, or
    the sidecar) and ``"source"`` (``"metadata"`` or ``"sidecar"``) added.

    Raises:
        CalibrationError: the calibration is not valid, or was made for another model
            (the sidecar's file SHA-256, or the metadata's graph hash, differs: both
            hashes named).
    """
    record = _metadata_calibration(model)
    if record is not None:
        return record
    path = sidecar_path(model)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a calibration file ({exc})") from None
    record = _check_record(record, path)
    wanted = record["model_sha256"]
    actual = model_sha256(model)
    if actual != wanted:
        raise CalibrationError(
            f"{path} was made for a model file with SHA-256 {wanted}, but {os.fspath(model)} "
            f"has SHA-256 {actual}: recalibrate with python -m eval.calibrate"
        )
    record["path"] = path
    record["source"] = "sidecar"
    return record


def pick_entry(record: dict[str, Any], far: float) -> dict[str, Any]:
    """The entry calibrated at ``far``, else the one whose target is closest to it."""
    return min(record["entries"], key=lambda e: abs(math.log(float(e["far_target"]) / far)))


def write_calibration(
    model: str | os.PathLike[str], bin_path: str, entries: list[dict[str, Any]], **extra: Any
) -> str:
    """Write ``model``'s sidecar atomically; returns its path."""
    path = sidecar_path(model)
    write_json(
        path,
        {
            "format": FORMAT,
            "model": os.path.basename(os.fspath(model)),
            "model_sha256": model_sha256(model),
            "bin": os.path.abspath(bin_path),
            "bin_sha256": sha256_file(bin_path),
            "entries": entries,
            **extra,
        },
    )
    return path


def write_calibration_into_model(
    model: str | os.PathLike[str], bin_path: str, entries: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """Write the calibration into an ONNX model's metadata (:data:`METADATA_KEY`,
    replacing one already there), the file rewritten atomically; returns the record.

    Raises:
        CalibrationError: ``model`` is not an ONNX file exported by this project.
    """
    import onnx

    proto = _load_onnx(model)
    if not any(e.key == OUR_EXPORT_KEY for e in proto.metadata_props):
        raise CalibrationError(
            f"{os.fspath(model)}: --into-model writes into ONNX files exported by this "
            f"project (metadata {OUR_EXPORT_KEY!r}); this one is not: use the sidecar"
        )
    _without_calibration(proto)
    record = {
        "format": FORMAT,
        "model": os.path.basename(os.fspath(model)),
        "model_sha256": model_graph_sha256(proto),
        "model_hash": GRAPH_HASH,
        "bin": os.path.abspath(bin_path),
        "bin_sha256": sha256_file(bin_path),
        "entries": entries,
        **extra,
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(record, allow_nan=False)
    with atomic_path(model) as tmp:
        onnx.save(proto, str(tmp))
    return record


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.calibrate",
        description="Thresholds at target false-accept rates, measured on a verification "
        ".bin, written next to the model (<model>.calibration.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="ONNX file, or a backbone checkpoint")
    p.add_argument("--network", help="backbone name for a checkpoint (r50, mbf, ...)")
    p.add_argument("--bin", required=True, help="verification pairs (LFW format, eval.make_bin)")
    p.add_argument("--far", type=float, nargs="+", default=list(DEFAULT_FARS), help="target FARs")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=64, help="faces per model call")
    p.add_argument(
        "--into-model",
        action="store_true",
        help=f"write the calibration into the ONNX model's metadata (key {METADATA_KEY!r}; "
        "ONNX files exported by this project) instead of the sidecar",
    )
    add_input_arguments(p)
    args = p.parse_args(argv)
    bad = [f for f in args.far if not 0 < f < 1]
    if bad:
        p.error(f"--far must be in (0, 1), got {bad[0]}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the sidecar's content."""
    args = _parse_args(argv)
    from eval.bin_io import load_bin
    from eval.faces import embed_aligned, open_model

    if args.into_model and not is_our_onnx(args.model):  # before any work
        raise CalibrationError(
            f"{printable(args.model)}: --into-model writes into ONNX files exported by this "
            f"project (metadata {OUR_EXPORT_KEY!r}); this one is not: leave --into-model out "
            "for the sidecar"
        )
    embed, size = open_model(args.model, args.network, args.device, input_options(args))
    if hasattr(embed, "describe"):
        print(embed.describe(), file=sys.stderr)
    pairs = load_bin(args.bin, (size, size))
    same = np.asarray(pairs.issame, dtype=bool)
    if same.all():
        raise CalibrationError(f"{args.bin}: no impostor pairs to calibrate a FAR on")
    crops = np.ascontiguousarray(pairs.images.numpy().transpose(0, 2, 3, 1)[..., ::-1])
    names = [f"{printable(args.bin)}: bins[{i}]" for i in range(len(crops))]
    emb = embed_aligned(embed, crops, args.batch_size, names=names).astype(np.float64)
    scores = np.einsum("ij,ij->i", emb[0::2], emb[1::2])
    entries = calibrate_scores(scores, same, sorted(set(args.far), reverse=True))
    convention = embed.convention() if hasattr(embed, "convention") else None
    if args.into_model:
        record = write_calibration_into_model(
            args.model, args.bin, entries, input_convention=convention
        )
        where = f"the metadata of {printable(args.model)} (key {METADATA_KEY!r})"
    else:
        path = write_calibration(args.model, args.bin, entries, input_convention=convention)
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        where = printable(path)
    print(f"{printable(args.model)} on {printable(args.bin)}:")
    for e in entries:
        print("  " + describe_entry(e))
        if e["few_impostors"]:
            print(f"warning: {describe_entry(e)}", file=sys.stderr)
    print(f"calibration -> {where}")
    return record


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.calibrate"))
