"""datasets: properties over arbitrary inputs (hypothesis) where hand-picked cases hid
planted bugs (issue 26), and the alignment of non-square crops.

* :func:`datasets.multi.apportion`: the shares sum to the total, each is the floor or the
  ceiling of its quota, and the leftover units go to the largest remainders;
* :class:`datasets.sampler.DistributedFaceSampler`: the ranks of any world size split the
  same global batches, and a position saved at one world size resumes at another;
* RecordIO framing and files, and Arrow shards: arbitrary records come back byte for byte;
* :class:`datasets.multi.ConcatFaceDataset`: labels of several datasets are shifted by the
  class counts before them, and a part's out-of-range label is never hidden by the shift;
* :func:`datasets.faces.align.align_face` on a 128x96 (H x W) crop puts the landmarks on the
  template scaled by W / 112 across and H / 112 down.

Examples are bounded (``max_examples`` small, no deadline) and derandomized, so the
file runs in seconds and the same way every time.
"""

from __future__ import annotations

import math
import struct
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from datasets.arrow_io import ArrowDataset, convert_to_shards
from datasets.dataset import FaceDataset
from datasets.errors import LabelRangeError
from datasets.faces.align import ARCFACE_TEMPLATE, align_face, similarity_transform
from datasets.multi import KEY_STRIDE, ConcatFaceDataset, apportion
from datasets.recordio import (
    MAGIC,
    IndexedRecordIO,
    IRHeader,
    MXRecordIO,
    RecordIOError,
    decode_record,
    encode_record,
    pack,
    pack_img,
    read_idx_file,
    unpack,
    unpack_img,
)
from datasets.sampler import DistributedFaceSampler

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SLOW_PROPERTY = settings(PROPERTY, max_examples=15)  # examples that write files


# --------------------------------------------------------------------- apportion
def test_apportion_takes_the_floor_of_each_quota() -> None:
    """The planted bug: rounding each quota (instead of its floor) over-allocates,
    ``apportion(16, [.1, .5, 2, .1, .1])`` gave 21 shares. Quotas 0.571, 2.857, 11.43,
    0.571, 0.571: floors 0, 2, 11, 0, 0 and 3 units left, to the remainders .857 (index
    1) and the first two of the tied .571s (indices 0 and 3)."""
    assert apportion(16, [0.1, 0.5, 2, 0.1, 0.1]) == [1, 3, 11, 1, 0]


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Hamilton's method written out by hand: exact quotas, floors, and the leftover
    units to the largest remainders, lower index first among equals."""
    exact = [Fraction(w) for w in weights]
    quotas = [total * w / sum(exact) for w in exact]
    shares = [q.numerator // q.denominator for q in quotas]
    ranked = sorted(range(len(weights)), key=lambda i: (shares[i] - quotas[i], i))
    for i in ranked[: total - sum(shares)]:
        shares[i] += 1
    return shares


@PROPERTY
@given(
    total=st.integers(0, 10**6),
    weights=st.lists(
        st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
        | st.sampled_from([0.1, 0.5, 1.0, 2.0]),  # ties of equal weights
        min_size=1,
        max_size=8,
    ),
)
def test_apportion_sums_to_the_total_within_floor_and_ceiling(total, weights) -> None:
    shares = apportion(total, weights)
    quotas = [total * Fraction(w) / sum(Fraction(v) for v in weights) for w in weights]
    assert sum(shares) == total
    for share, quota in zip(shares, quotas, strict=True):
        assert math.floor(quota) <= share <= math.ceil(quota)
    assert shares == _largest_remainder(total, weights)


# ----------------------------------------------------------------------- sampler
def _global_batches(n: int, world: int, batch: int, seed: int, drop_last: bool, state=None):
    """Each step's global batch as the ranks see it: rank 0's slice, then rank 1's, ...
    (items are ``(index, aug_seed)``)."""
    per_rank = []
    for rank in range(world):
        s = DistributedFaceSampler(n, batch, rank, world, seed=seed, drop_last=drop_last)
        s.set_epoch(2)
        if state is not None:
            s.load_state_dict(state)
        items = list(s)
        assert len(items) == len(s) and len(items) % batch == 0
        per_rank.append([items[i : i + batch] for i in range(0, len(items), batch)])
    steps = {len(p) for p in per_rank}
    assert len(steps) == 1  # every rank takes the same number of steps
    return [[item for p in per_rank for item in p[k]] for k in range(steps.pop())]


@PROPERTY
@given(
    n=st.integers(1, 120),
    global_batch=st.sampled_from([1, 2, 4, 6, 8, 12]),
    seed=st.integers(0, 2**40),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_every_world_size_splits_the_same_global_batches(
    n, global_batch, seed, drop_last, data
) -> None:
    divisors = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
    world = data.draw(st.sampled_from(divisors), label="world")
    reference = _global_batches(n, 1, global_batch, seed, drop_last)
    split = _global_batches(n, world, global_batch // world, seed, drop_last)
    assert split == reference  # same samples, same order, same augmentation seeds
    indices = [i for batch in reference for i, _ in batch]
    if drop_last:
        assert len(reference) == n // global_batch
        assert len(set(indices)) == len(indices)  # no sample twice in an epoch
    else:  # every sample, the last batch completed from the start of the permutation
        assert len(reference) == -(-n // global_batch)
        assert set(indices) == set(range(n))


@PROPERTY
@given(
    n=st.integers(4, 120),
    batches=st.tuples(st.sampled_from([(1, 4), (2, 2), (4, 1)]), st.sampled_from([1, 2, 3])),
    seed=st.integers(0, 1000),
    done=st.integers(0, 30),
    data=st.data(),
)
def test_position_saved_at_one_world_size_resumes_at_another(n, batches, seed, done, data) -> None:
    """A position after ``done`` batches at world size W0 (global batch G0) resumes at
    W1 x B1 on the next unseen sample of the same permutation: no repeat, no skip."""
    (w0, b0), w1 = batches
    b1 = data.draw(st.integers(1, 4), label="b1")
    saver = DistributedFaceSampler(n, b0, 0, w0, seed=seed, drop_last=False)
    saver.set_epoch(1)
    assume(done <= len(saver) // b0)
    list(saver)
    state = saver.state_dict(batches_done=done)
    assert state["consumed"] == min(done * w0 * b0, n)
    perm = saver.permutation().tolist()
    resumed = _global_batches(n, w1, b1, seed, False, state)
    seen = [i for batch in resumed for i, _ in batch]
    rest = perm[state["consumed"] :]
    assert seen[: len(rest)] == rest  # the remaining samples, in order
    assert len(seen) - len(rest) < w1 * b1  # then at most the wrap-around of one batch


# ---------------------------------------------------------------------- RecordIO
_MAGIC = struct.pack("<I", MAGIC)
# payloads built from random bytes and magic words, so that magic words fall at aligned
# and unaligned offsets, at the very start and end, and back to back
_PAYLOADS = st.lists(st.binary(max_size=9) | st.just(_MAGIC), max_size=8).map(b"".join)


@PROPERTY
@given(payload=_PAYLOADS, lead=st.binary(max_size=12).map(lambda b: b[: len(b) & ~3]))
def test_record_framing_round_trips_any_payload(payload: bytes, lead: bytes) -> None:
    framed = encode_record(payload)
    assert len(framed) % 4 == 0
    # a record read from inside a file: after other (4-aligned) bytes, before others
    buf = lead + framed + _MAGIC
    got, after = decode_record(buf, len(lead), "test")
    assert got == payload and after == len(lead) + len(framed)


@PROPERTY
@given(
    # (an empty label array is flag 0, a scalar 0: MXNet's format cannot tell them apart)
    label=st.floats(-1e6, 1e6, width=32)
    | st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=5),
    ids=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    payload=_PAYLOADS,
)
def test_image_record_headers_round_trip(label, ids, payload: bytes) -> None:
    header, body = unpack(pack(IRHeader(0, label, *ids), payload))
    assert body == payload and (header.id, header.id2) == ids
    if isinstance(label, list):
        assert header.flag == len(label)
        assert np.array_equal(header.label, np.asarray(label, np.float32))
    else:
        assert header.flag == 0 and header.label == label  # float32-exact labels


@SLOW_PROPERTY
@given(
    records=st.lists(
        st.tuples(st.integers(0, 10**9), _PAYLOADS), max_size=10, unique_by=lambda r: r[0]
    )
)
def test_record_files_round_trip_sequentially_and_by_key(records) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rec, idx = Path(tmp) / "x.rec", Path(tmp) / "x.idx"
        with IndexedRecordIO(idx, rec, "w") as writer:
            for key, payload in records:
                writer.write_idx(key, payload)
        reader = IndexedRecordIO(idx, rec, "r")
        assert reader.keys == [k for k, _ in records]
        for key, payload in reversed(records):  # random access, any order
            assert reader.read_idx(key) == payload
        assert list(MXRecordIO(rec, "r")) == [p for _, p in records]
        reader.close()


def _frame(cflag: int, body: bytes) -> bytes:
    """One framing part: magic, ``cflag << 29 | len``, body padded to 4 bytes."""
    return _MAGIC + struct.pack("<I", cflag << 29 | len(body)) + body + b"\0" * (-len(body) % 4)


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (_frame(2, b"abcd"), "starts with continuation flag 2"),
        (_frame(3, b"abcd"), "starts with continuation flag 3"),
        (_frame(1, b"ab") + _frame(1, b"cd"), "continuation flag 1 .* inside a multi-part"),
        (_frame(1, b"ab") + _frame(0, b"cd"), "continuation flag 0 .* inside a multi-part"),
        (_frame(1, b"ab"), "truncated record"),
        (_frame(0, b"abcdefgh")[:-1], "truncated record"),
    ],
)
def test_broken_framing_is_named(buf: bytes, message: str) -> None:
    with pytest.raises(RecordIOError, match=message):
        decode_record(buf, 0, "x.rec key 3")


def test_multi_part_records_join_their_parts_with_the_magic_word() -> None:
    """What MXNet's writer does with a payload holding aligned magic words."""
    framed = _frame(1, b"ab12") + _frame(2, b"") + _frame(3, b"cd")
    assert decode_record(framed, 0, "x")[0] == b"ab12" + _MAGIC + _MAGIC + b"cd"


def test_array_labels_longer_than_the_record_are_refused() -> None:
    raw = pack(IRHeader(0, [1.0, 2.0, 3.0], 0, 0), b"")
    assert unpack(raw)[0].flag == 3
    with pytest.raises(RecordIOError, match="announces 3 float32 labels but only 8 bytes"):
        unpack(raw[:-4])
    with pytest.raises(RecordIOError, match="shorter than the 24-byte header"):
        unpack(raw[:23])


def test_image_records_honour_format_and_quality() -> None:
    """JPEG quality and PNG compression reach the encoder (95 by default); an image read
    back unchanged keeps its channels (a grey PNG stays 2-D)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    header = IRHeader(0, 3.0, 7, 0)
    default = pack_img(header, img)
    assert default == pack_img(header, img, quality=95, img_fmt=".jpg")
    assert default != pack_img(header, img, quality=60, img_fmt=".jpg")
    assert pack_img(header, img, img_fmt=".JPEG") != pack_img(header, img, 60, ".JPEG")
    smooth = np.repeat(np.add.outer(np.arange(24), np.arange(20)).astype(np.uint8)[..., None], 3, 2)
    loose = pack_img(header, smooth, quality=0, img_fmt=".png")  # stored, not deflated
    tight = pack_img(header, smooth, quality=9, img_fmt=".png")
    assert len(loose) > len(tight)
    for raw in (loose, tight):
        got_header, got = unpack_img(raw)
        assert got_header.label == 3.0 and np.array_equal(got, smooth)  # PNG: lossless
    grey = pack_img(header, img[..., 0], img_fmt=".png")
    assert unpack_img(grey)[1].shape == (24, 20)
    assert unpack_img(grey, iscolor=1)[1].shape == (24, 20, 3)
    with pytest.raises(RecordIOError, match="undecodable image"):
        unpack_img(pack(header, b"not an image"))


def test_index_offsets_at_the_end_of_the_file_are_refused(tmp_path: Path) -> None:
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with IndexedRecordIO(idx, rec, "w") as w:
        w.write_idx(1, b"abcd")
        w.write_idx(2, b"efgh")
    size = rec.stat().st_size
    keys, offsets = read_idx_file(idx, size)
    assert keys == [1, 2] and offsets == {1: 0, 2: size // 2}
    for offset, why in ((size, "at or past the end"), (-4, "negative")):
        idx.write_text(f"1\t0\n2\t{offset}\n")
        with pytest.raises(RecordIOError, match=why):
            read_idx_file(idx, size)
    idx.write_text("1\t0\n")  # offset 0 of an empty .rec: past its end, not negative
    with pytest.raises(RecordIOError, match=r"at or past the end of the \.rec \(0 bytes\)"):
        read_idx_file(idx, 0)
    idx.write_text(f"1\t0\n2\t{size}\n")
    reader = IndexedRecordIO(idx, rec, "r")  # unchecked at open: checked when read
    with pytest.raises(RecordIOError, match="beyond the end of the file") as info:
        reader.read_idx(2)
    assert (info.value.key, info.value.offset) == (2, size)
    reader.close()
    plain = MXRecordIO(rec, "r")
    with pytest.raises(RecordIOError, match="byte offset -4 is negative"):
        plain.read_at(-4, key=2)
    plain.close()
    idx.write_text(f"1\t0\n2\t{size // 2}\n")
    reader = IndexedRecordIO(idx, rec, "r")
    reader.seek(2)
    assert reader.read() == b"efgh" and reader.tell() == size
    reader.seek(1)
    assert reader.read() == b"abcd" and reader.tell() == size // 2
    assert [*reader] == [b"abcd", b"efgh"]  # iteration starts from the beginning
    assert reader.file_size == size
    reader.close()
    with pytest.raises(FileNotFoundError, match=r"RecordIO file .*missing\.rec"):
        IndexedRecordIO(tmp_path / "missing.idx", tmp_path / "missing.rec", "r")
    with pytest.raises(FileNotFoundError, match=r"RecordIO index .*missing\.idx"):
        IndexedRecordIO(tmp_path / "missing.idx", rec, "r")


def test_read_errors_carry_file_key_and_offset(tmp_path: Path) -> None:
    """A record that fails to decode names its file, key and byte offset (as attributes,
    for the loader's one-line error); a malformed ``.idx`` line is named."""
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with IndexedRecordIO(idx, rec, "w") as w:
        w.write_idx(5, b"abcd")
        w.write_idx(9, b"efgh")
    data = bytearray(rec.read_bytes())
    second = len(data) // 2
    data[second] ^= 0xFF  # the second record's magic word
    rec.write_bytes(bytes(data))
    reader = IndexedRecordIO(idx, rec, "r")
    with pytest.raises(RecordIOError, match="bad magic word") as info:
        reader.read_idx(9)
    assert (info.value.path, info.value.key, info.value.offset) == (str(rec), 9, second)
    reader.close()
    idx.write_text("5\t0\nnot a line\n")
    with pytest.raises(RecordIOError, match="line 2: expected 'key<TAB>offset'"):
        read_idx_file(idx)


def test_a_reader_pickles_without_its_map_and_a_writer_does_not_pickle(tmp_path: Path) -> None:
    import pickle

    rec = tmp_path / "x.rec"
    with MXRecordIO(rec, "w") as w:
        w.write(b"abcd")
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(w)
    w.close()  # closing again is a no-op, not a second commit
    w.abort()  # nor is aborting a closed writer
    with pytest.raises(KeyError), IndexedRecordIO(tmp_path / "z.idx", tmp_path / "z.rec", "w") as z:
        z.write_idx(1, b"ijkl")
        z.write_idx(1, b"mnop")  # a key written twice: the writer is discarded
    z.abort()  # and aborting again is a no-op
    abandoned = MXRecordIO(tmp_path / "y.rec", "w")
    abandoned.write(b"efgh")
    del abandoned  # dropped without close: discarded, no file and no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.rec"]
    reader = MXRecordIO(rec, "r")
    assert reader.read() == b"abcd"
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._map is None and list(clone) == [b"abcd"]
    reader.close()


# -------------------------------------------------------------------------- Arrow
class _Memory(FaceDataset):
    """Records held in memory: ``(payload, label)`` pairs."""

    def __init__(self, records: list[tuple[bytes, int]], num_classes: int) -> None:
        super().__init__(flip=False)
        self.records = records
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[bytes, int, str | None]:
        payload, label = self.records[index]
        return payload, label, None


@SLOW_PROPERTY
@given(
    classes=st.integers(1, 5),
    raw=st.lists(st.tuples(st.binary(max_size=30), st.integers(0, 100)), min_size=1, max_size=25),
    shard_size=st.integers(1, 9),
)
def test_arrow_shards_round_trip_any_records(classes, raw, shard_size) -> None:
    records = [(payload, label % classes) for payload, label in raw]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = convert_to_shards(
            _Memory(records, classes), tmp, shard_size=shard_size, progress=False, check=False
        )
        assert [s["rows"] for s in manifest["shards"]] == [
            min(shard_size, len(records) - lo) for lo in range(0, len(records), shard_size)
        ]
        back = ArrowDataset(tmp)
        assert len(back) == len(records) and back.num_classes == classes
        for i, (payload, label) in enumerate(records):
            got, got_label, _ = back._load(i)
            assert bytes(got) == payload and got_label == label, i


# --------------------------------------------------------------- label offsets
@PROPERTY
@given(
    parts=st.lists(
        st.tuples(st.integers(1, 6), st.integers(1, 7)), min_size=1, max_size=5
    ),  # (classes, images) of each part
    seed=st.integers(0, 2**16),
)
def test_labels_of_several_datasets_are_shifted_by_the_classes_before_them(parts, seed) -> None:
    rng = np.random.default_rng(seed)
    datasets = []
    for p, (classes, images) in enumerate(parts):
        labels = rng.integers(0, classes, images).tolist()
        datasets.append(_Memory([(f"{p}:{j}".encode(), y) for j, y in enumerate(labels)], classes))
    paths = [f"/data/d{p}" for p in range(len(parts))]
    concat = ConcatFaceDataset(datasets, paths, check_image_size=False)  # payloads: no images
    assert concat.num_classes == sum(c for c, _ in parts) and len(concat) == sum(
        n for _, n in parts
    )
    index = 0
    for p, d in enumerate(datasets):
        class_offset = sum(c for c, _ in parts[:p])
        entry = concat.table()[p]
        assert (entry["class_offset"], entry["image_offset"]) == (class_offset, index)
        for j in range(len(d)):
            payload, label, _ = concat._load(index)
            assert bytes(payload) == f"{p}:{j}".encode()
            assert label == class_offset + d.records[j][1]
            assert concat.locate(index) == (p, j)
            assert concat.sample_key(index) == p * KEY_STRIDE + j
            index += 1
    # a part's label equal to its own class count is out of range, even where the
    # shifted value would be a valid label of the next part
    datasets[0].records[0] = (b"bad", parts[0][0])
    with pytest.raises(LabelRangeError, match=r"root\[0\] \(/data/d0\)"):
        concat._load(0)


# ----------------------------------------------------------------------- alignment
def test_alignment_of_a_non_square_crop_puts_landmarks_on_the_scaled_template() -> None:
    """Align a 128 x 96 (H x W) crop from landmarks that are a known similarity image
    of the template. The source image holds its own pixel coordinates (channel 0 = x,
    1 = y, float32), so every output pixel reads back the source point it came from:
    bilinear interpolation reproduces an affine function exactly, and the output's
    coordinates are an affine function of the output pixel. Fitting that function and
    evaluating it at the scaled template must give the landmarks."""
    height, width = 128, 96
    template = ARCFACE_TEMPLATE * np.array([width / 112.0, height / 112.0])
    angle, scale, shift = 0.3, 1.4, np.array([70.0, 40.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = template @ rot.T + shift
    ys, xs = np.mgrid[0:260, 0:260].astype(np.float32)
    source = np.stack([xs, ys, np.ones_like(xs)], axis=2)
    out = align_face(source, landmarks, size=(height, width))
    assert out.shape == (height, width, 3)
    # pixels whose source neighbourhood lies wholly inside the image read back exactly 1
    # in the constant channel (a black border pixel mixed in takes at least 1/32 off)
    inside = np.abs(out[..., 2] - 1.0) < 2.0**-10
    assert inside.sum() > height * width // 2
    v, u = np.mgrid[0:height, 0:width]
    design = np.stack([u[inside], v[inside], np.ones(inside.sum())], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, out[inside][:, :2].astype(np.float64), rcond=None)
    mapped = np.c_[template, np.ones(5)] @ coef
    # OpenCV's warpAffine quantises each source coordinate to 1/32 pixel (INTER_BITS 5):
    # at most 2**-6 px per sample, which the least-squares fit averages down; the
    # float32 coordinates add 260 * 2**-24 px. The swapped template is 24 px off.
    tol = 2.0**-6 + 260 * 2.0**-24
    assert np.abs(mapped - landmarks).max() <= tol


def test_template_is_insightfaces_and_the_border_is_black() -> None:
    """The template is insightface's ``arcface_dst`` (face_align.py), typed here from
    its source rather than imported; the border the warp leaves is black."""
    insightface = [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
    assert ARCFACE_TEMPLATE.tolist() == insightface
    # landmarks at half the template: output pixel p shows source pixel p / 2, so a
    # 40 x 40 image fills the crop's top-left 80 x 80 and the rest is border
    image = np.full((40, 40, 3), 200, np.uint8)
    out = align_face(image, ARCFACE_TEMPLATE / 2)
    assert out.shape == (112, 112, 3)
    assert (out[:78, :78] == 200).all()
    assert (out[84:, :] == 0).all() and (out[:, 84:] == 0).all()


@pytest.mark.parametrize(
    ("src", "dst", "why"),
    [
        (np.zeros((5, 2)), np.zeros((4, 2)), "need matching"),  # different counts
        (np.zeros((5, 3)), np.zeros((5, 3)), "need matching"),  # not 2-D points
        (np.zeros(10), np.zeros(10), "need matching"),  # not (N, 2)
        (np.zeros((1, 2)), np.zeros((1, 2)), "need matching"),  # one point
        (np.ones((3, 2)), np.zeros((3, 2)), "all identical"),
    ],
)
def test_similarity_transform_refuses_point_sets_it_cannot_fit(src, dst, why) -> None:
    """Refused with its own message (NumPy's errors would be ValueErrors too)."""
    with pytest.raises(ValueError, match=why):
        similarity_transform(src, dst)


@PROPERTY
@given(
    angle=st.floats(-3.1, 3.1),
    scale=st.floats(0.2, 5.0),
    shift=st.tuples(st.floats(-100, 100), st.floats(-100, 100)),
    points=st.integers(2, 6),
    reflect=st.booleans(),
)
def test_similarity_transform_recovers_a_known_similarity(angle, scale, shift, points, reflect):
    """Points mapped by a similarity (given as plain lists) give back that similarity;
    mirrored points (no proper rotation fits them) give the best rotation, never a
    reflection."""
    rng = np.random.default_rng(points)
    src = rng.uniform(0, 100, (points, 2))
    assume(np.linalg.matrix_rank(src - src.mean(0)) == 2 or points == 2)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + np.array(shift)
    if reflect:
        dst = dst * np.array([-1.0, 1.0])
    m = similarity_transform(src.tolist(), dst.tolist())
    assert np.linalg.det(m[:, :2]) > 0  # a rotation and a scale: no reflection
    if not reflect:
        # float64 SVD and sums of <= 6 points of size <= ~600: |error| <= ~1e3 * U64 * 600
        tol = 1e3 * 2.0**-53 * 600
        assert np.abs(m[:, :2] - rot).max() <= tol * scale
        assert np.abs(src @ m[:, :2].T + m[:, 2] - dst).max() <= tol * (1 + scale) * 100
