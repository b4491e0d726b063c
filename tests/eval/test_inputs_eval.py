"""Evaluation inputs (issue 20, items 5 and 12): export parity fails on non-finite
outputs; ``.bin`` targets are checked at start-up; reading an untrusted ``.bin`` is
bounded in memory before anything is allocated."""

from __future__ import annotations

import pickle
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from configs import Config, ConfigError, apply_overrides
from eval.bin_io import BinFileError, BinLimits, load_bin, restricted_loads
from eval.onnx_export import ParityError, check_parity, export_onnx
from trainer.build import build_evaluator

# ---------------------------------------------------------------- export parity


class _NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        with torch.no_grad():
            self.fc.weight.fill_(float("nan"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def test_export_parity_fails_on_a_nan_model(tmp_path):
    model = _NaNNet().eval()
    path = export_onnx(model, tmp_path / "nan.onnx", image_size=(8, 8), exporter="torchscript")
    with pytest.raises(ParityError, match=r"nan\.onnx: PyTorch produced 4 non-finite values"):
        check_parity(model, path, image_size=(8, 8), batch_sizes=(1,))


def test_export_parity_fails_when_only_onnxruntime_is_not_finite(tmp_path):
    model = _NaNNet().eval()
    path = export_onnx(model, tmp_path / "nan.onnx", image_size=(8, 8), exporter="torchscript")
    with torch.no_grad():
        model.fc.weight.fill_(0.5)  # PyTorch is finite now, the exported file is not
    with pytest.raises(ParityError, match=r"onnxruntime produced 12 non-finite values"):
        check_parity(model, path, image_size=(8, 8), batch_sizes=(3,))


# ---------------------------------------------------------------- bounded .bin reading


def _png(size: int = 16) -> bytes:
    return cv2.imencode(".png", np.full((size, size, 3), 128, np.uint8))[1].tobytes()


def _write(tmp_path, data: bytes, name: str = "evil.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_declared_length_the_file_cannot_back_is_refused_before_allocation(tmp_path):
    # BINBYTES8 announcing 1 TiB, followed by 3 bytes: CPython would allocate first
    data = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc."
    with pytest.raises(BinFileError, match=r"evil\.bin: not a valid pickle .*bytes8"):
        load_bin(_write(tmp_path, data))


def test_a_huge_memo_index_is_refused(tmp_path):
    data = b"\x80\x02]r" + struct.pack("<I", 0xFFFFFFF0) + b"."  # LONG_BINPUT 4e9
    with pytest.raises(BinFileError, match=r"evil\.bin: pickle memo index 4294967280"):
        load_bin(_write(tmp_path, data))


def test_a_huge_frame_is_refused(tmp_path):
    data = b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"]."
    with pytest.raises(BinFileError, match=r"evil\.bin: pickle frame of 1099511627776 bytes"):
        load_bin(_write(tmp_path, data))


class _Reduce:
    def __init__(self, fn, args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (
            _Reduce(np.ndarray, ((10**7,), "u1")),
            r"an array of shape \(10000000,\) uint8 declares more bytes than the file holds",
        ),
        (_Reduce(bytearray, (10**7,)), r"bytearray\(int\) is not allowed"),
        (np.array([b"x", None], dtype=object), r"arrays of Python objects are not allowed"),
    ],
)
def test_declared_array_sizes_and_object_arrays_are_refused(obj, why):
    data = pickle.dumps(([obj, obj], [True]), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=rf"t\.bin: {why}"):
        restricted_loads(data, source="t.bin")


def test_image_count_and_decoded_size_are_capped_before_allocation(tmp_path):
    path = _write(tmp_path, pickle.dumps(([_png()] * 12, [True] * 6), protocol=4), "many.bin")
    with pytest.raises(BinFileError, match=r"many\.bin: 12 images, more than the 10"):
        load_bin(path, limits=BinLimits(max_images=10))
    # 12 tiny PNGs would decode to 12 x 3 x 112 x 112 bytes: more than 2x the file
    limits = BinLimits(output_bytes_per_file_byte=2, min_output_budget=0)
    with pytest.raises(BinFileError, match=r"many\.bin: 12 images of 112x112 would take 451584"):
        load_bin(path, limits=limits)
    assert load_bin(path).images.shape == (12, 3, 112, 112)  # the defaults allow it


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00" * 16
    )


def test_decoded_image_size_is_read_from_the_header_and_capped(tmp_path):
    bins = [_png(), _png_header(5000, 5000)]
    path = _write(tmp_path, pickle.dumps((bins, [True]), protocol=4), "big.bin")
    with pytest.raises(
        BinFileError,
        match=r"big\.bin: bins\[1\]: the image header declares "
        r"5000x5000 pixels",
    ):
        load_bin(path)


# ---------------------------------------------------------------- start-up check


def _cfg(tmp_path, *targets: str) -> Config:
    return apply_overrides(
        Config(),
        [
            f"data.root={tmp_path}",
            "data.num_classes=2",
            "data.num_images=2",
            f"eval.targets=[{', '.join(repr(t) for t in targets)}]",
        ],
    )


def test_every_eval_target_is_loaded_and_checked_at_start_up(tmp_path):
    good = pickle.dumps(([_png(), _png()], [True]), protocol=4)
    (tmp_path / "lfw.bin").write_bytes(good)
    (tmp_path / "cfp_fp.bin").write_bytes(good[:-20])  # truncated
    assert build_evaluator(_cfg(tmp_path, "lfw")) is not None
    with pytest.raises(
        ConfigError, match=r"eval\.targets: .cfp_fp.: .*cfp_fp\.bin: pickle frame of \d+ bytes"
    ):
        build_evaluator(_cfg(tmp_path, "lfw", "cfp_fp"))
    with pytest.raises(ConfigError, match=r"eval\.targets: no .*agedb_30\.bin"):
        build_evaluator(_cfg(tmp_path, "lfw", "agedb_30"))
    (tmp_path / "calfw.bin").write_bytes(pickle.dumps(([b"junk", b"junk"], [True])))
    with pytest.raises(ConfigError, match=r"eval\.targets: 'calfw': .*calfw\.bin: bins\[0\]"):
        build_evaluator(_cfg(tmp_path, "calfw"))
