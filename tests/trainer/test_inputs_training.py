"""Training's inputs and outputs, third round (issue 24, items 2, 4, 6, 7, 12, 14, 18 and
19, and the one error path): an output directory training owns, with lock and probe
files that never follow a symlink; checkpoint writes that fail as one line naming the
file and the cause, clean up, and need no manual clean-up before a rerun; datasets
identified by their files, not their path text; presets chosen by exact name; data files
checked while a run reads them; non-finite ``model.init_from`` weights; the root
directory refused; the summary listing what was written."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import train_dist
import trainer.preflight as preflight
from common.cli import run_main
from common.dist import DistContext
from common.errors import UsageError, UserError
from common.outdir import LOCK_NAME, MANIFEST_NAME
from configs import ConfigError, load_config
from datasets.arrow_shards import main as arrow_main
from datasets.errors import DataError
from tests.trainer.test_trainer import TensorLoader, dataset, make_cfg, make_trainer
from trainer.build import build_backbone, build_loader, check_output_space
from trainer.checkpoint import CheckpointError
from trainer.finetune import load_init_weights
from trainer.loop import TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
IDS, PER_ID = 4, 6  # the tiny synthetic dataset of tests/trainer/test_trainer_entry.py
TORCH_ZIP_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    """A few seconds of ``configs/demo`` on the tiny dataset: 4 steps an epoch."""
    return [
        "configs/demo",
        f"data.root={data}",
        f"data.num_classes={IDS}",
        f"data.num_images={IDS * PER_ID}",
        "data.batch_size=6",
        "data.num_workers=0",
        f"train.output={out}",
        "train.epochs=1",
        "checkpoint.every_steps=0",
        "eval.targets=",
        "eval.at_start=false",
        "log.tensorboard=false",
        "log.every_steps=2",
        *extra,
    ]


def _main(args: list[str]) -> tuple[int, str, str]:
    """``train_dist.main(args)`` with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_dist.main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(synthetic_data) -> Path:
    return synthetic_data(IDS, PER_ID, 4, 2, seed=1)


@pytest.fixture(scope="module")
def trained(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One finished run (TensorBoard off) and its stdout."""
    out = tmp_path_factory.mktemp("trained") / "run"
    code, stdout, err = _main(_args(tiny, out))
    assert code == 0, err
    return out, stdout


def _untouched(path: Path) -> tuple[bytes, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns


def _precious(tmp_path: Path) -> Path:
    target = tmp_path / "precious.txt"
    target.write_bytes(b"SECRET-BYTES of another user\n")
    os.utime(target, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return target


# ---------------------------------------------------------- item 2: owned output dirs
def test_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = _precious(tmp_path)
    before = _untouched(target)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(target)
    code, _, err = _main(["configs/demo", f"train.output={out}"])
    assert code == 1
    assert err.startswith(f"error: train.output='{out}': the lock file {out / LOCK_NAME} is a ")
    assert "symlink" in err and len(err.strip().splitlines()) == 1
    assert "SECRET" not in err  # the target's bytes are never echoed
    assert _untouched(target) == before  # content and mtime
    assert (out / LOCK_NAME).is_symlink() and not (out / MANIFEST_NAME).exists()


def test_symlinked_write_probe_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = _precious(tmp_path)
    before = _untouched(target)
    out = tmp_path / "run"
    out.mkdir()
    probe = out / f".write-probe-0-{os.getpid()}"  # the name this process probes with
    probe.symlink_to(target)
    code, _, err = _main(["configs/demo", f"train.output={out}"])
    assert code == 1
    assert f"{probe} already exists" in err and "refusing to write through it" in err
    assert _untouched(target) == before
    assert probe.is_symlink()


def test_a_directory_training_did_not_make_is_refused(tmp_path: Path) -> None:
    """A typo in train.output that names a dataset: refused, naming what is there;
    ``train.overwrite=true`` writes into it and keeps the files it does not write."""
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "train.rec").write_bytes(b"not yours to overwrite")
    before = _untouched(out / "train.rec")
    code, _, err = _main(["configs/demo", f"train.output={out}", f"data.root={tmp_path}/none"])
    assert code == 1
    assert err.strip() == (
        f"error: train.output='{out}' is not empty and was not made by train (it holds "
        "train.rec); choose a new or empty directory, or pass train.overwrite=true to "
        "write into it (files this run does not write are kept)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["train.rec"]  # nothing written
    code, _, err = _main(
        [
            "configs/demo",
            f"train.output={out}",
            f"data.root={tmp_path}/none",
            "train.overwrite=true",
        ]
    )
    assert code == 2 and "data.root" in err  # past the claim: the next problem is named
    assert _untouched(out / "train.rec") == before
    assert json.loads((out / MANIFEST_NAME).read_text())["command"] == "train"


def test_finished_run_commits_its_manifest_and_lists_what_it_wrote(
    trained: tuple[Path, str],
) -> None:
    """Items 2 and 19: the manifest names training and the outputs, complete; the
    summary lists what was written (no ``tensorboard/`` with TensorBoard off)."""
    out, stdout = trained
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["command"] == "train" and manifest["complete"] is True
    assert manifest["files"] == ["config.json", "train.log", "checkpoints/", "backbone.pt"]
    assert f"outputs in {out}: config.json, train.log, checkpoints/, backbone.pt" in stdout
    assert "tensorboard" not in stdout and not (out / "tensorboard").exists()
    assert not (out / LOCK_NAME).exists()


def test_rerun_resumes_into_its_own_directory_and_an_earlier_versions(
    tiny: Path, trained: tuple[Path, str], tmp_path: Path
) -> None:
    own, earlier = tmp_path / "own", tmp_path / "earlier"
    shutil.copytree(trained[0], own)
    shutil.copytree(trained[0], earlier)
    (earlier / MANIFEST_NAME).unlink()  # as a version before ownership manifests left it
    for run in (own, earlier):
        code, _, err = _main(_args(tiny, run, "train.epochs=2"))
        assert code == 0, err
        assert "resumed from" in (run / "train.log").read_text()
        assert json.loads((run / MANIFEST_NAME).read_text())["complete"] is True


# ---------------------------------------------- item 18: the root directory is refused
@pytest.mark.parametrize("root", ["/", "/tmp/..", "//"])
def test_root_directory_as_output_is_refused(root: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.output: is the root directory"):
        load_config("demo", [f"train.output={root}"])


# ------------------------------------------------- item 4: checkpoint write failures
def _torch_zip_failure(with_os_error: bool) -> Any:
    """A ``torch.save`` that writes a little and then fails as torch's zip writer does
    on a full disk: ``RuntimeError`` (raised while handling the write's ``OSError``)."""

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"\0" * 4096)
        if not with_os_error:
            raise RuntimeError(TORCH_ZIP_ERROR)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(TORCH_ZIP_ERROR) from None

    return save


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("with_os_error", [True, False])
def test_torch_writer_runtime_error_is_one_line_naming_file_and_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_os_error: bool
) -> None:
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    t.train_step([(x[:8], y[:8])])
    good = t.save_checkpoint()
    t.train_step([(x[8:16], y[8:16])])
    if not with_os_error:  # no errno to read: the free space names the cause
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**20))
    monkeypatch.setattr(torch, "save", _torch_zip_failure(with_os_error))
    with pytest.raises(CheckpointError) as info:
        t.save_checkpoint()
    monkeypatch.undo()
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "enforce fail" not in message
    tmp = tmp_path / "checkpoints" / ".tmp-step-00000002"
    assert f"cannot write {tmp}/head-00000.pt: No space left on device" in message
    if not with_os_error:
        assert "(3.00 MiB free there)" in message
    assert f"the previous checkpoint is intact: {good}" in message
    assert _leftovers(tmp_path) == []  # the temporary directory is gone
    assert t.save_checkpoint().name == "step-00000002"  # and the next save works


def test_torch_writer_error_on_a_roomy_disk_names_the_writers_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**40))
    monkeypatch.setattr(torch, "save", _torch_zip_failure(False))
    with pytest.raises(CheckpointError, match=r"head-00000\.pt: RuntimeError: \[enforce fail"):
        t.save_checkpoint()
    assert _leftovers(tmp_path) == []


def test_backbone_export_runtime_error_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.atomic import OutputWriteError

    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    monkeypatch.setattr(torch, "save", _torch_zip_failure(True))
    with pytest.raises(OutputWriteError) as info:
        t.export_backbone()
    assert str(info.value).startswith(
        f"cannot write {tmp_path / 'backbone.pt'}: No space left on device"
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_checkpoint_on_a_really_full_disk(small_tmpfs: Path) -> None:
    """ENOSPC from the file system itself: a 2 MiB tensor on a 1 MiB disk, which
    torch's zip writer reports as ``[enforce fail at inline_container.cc:672]
    unexpected pos``: one line, ``No space left on device``, nothing left behind."""
    from trainer.checkpoint import CheckpointStorage

    storage = CheckpointStorage(small_tmpfs / "checkpoints", DistContext())
    with pytest.raises(CheckpointError) as info:
        storage.save(1, {"backbone": torch.zeros(512 * 1024)}, {}, {})
    message = str(info.value)
    tmp = small_tmpfs / "checkpoints" / ".tmp-step-00000001"
    assert f"cannot write {tmp}/trainer.pt: No space left on device" in message, message
    assert len(message.splitlines()) == 1 and "enforce fail" not in message
    assert _leftovers(small_tmpfs) == []  # its 1 MiB is free again: a rerun just works
    assert storage.save(1, {"backbone": torch.zeros(1024)}, {}, {}).name == "step-00000001"


def test_rerun_needs_no_clean_up_of_an_interrupted_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save killed half-way left ``.tmp-step-*`` (ours) on a nearly full disk: the
    rerun removes it before checking the free space, instead of refusing to start."""
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    junk = tmp_path / "checkpoints" / ".tmp-step-00000007"
    junk.mkdir(parents=True)
    (junk / "head-00000.pt").write_bytes(b"\0" * 1_500_000)

    def used() -> int:
        return sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())

    budget = used() - 1_500_000 + 5 * 2**20  # a disk with 5 MiB free without the leftover
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=budget - used()))
    monkeypatch.setattr(preflight, "checkpoint_bytes_estimate", lambda *a, **k: 4 * 2**20)
    check_output_space(t, t.ctx)  # 1.5 MB of leftovers would leave < 4 MiB
    assert not junk.exists()


# ------------------------------------------------ item 6: one dataset listed twice
def test_one_dataset_reached_two_ways_is_refused_in_the_config(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tmp_path / "link"
    link.symlink_to(tiny)
    monkeypatch.chdir(tiny.parent)
    for second in (tiny / "train.rec", link, f"./{tiny.name}", tiny / ".." / tiny.name):
        with pytest.raises(ConfigError, match=r"data\.root\[1\]: repeats data\.root\[0\]"):
            load_config("demo", [f"data.root=[{tiny}, {second}]"])


def test_one_dataset_hard_linked_is_refused_by_its_inode(tiny: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    twin.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        os.link(tiny / name, twin / name)
    cfg = load_config(
        "demo",
        [f"data.root=[{tiny},{twin}]", f"data.num_classes={2 * IDS}", f"data.num_images={48}"],
    )
    with pytest.raises(DataError) as info:
        build_loader(cfg, DistContext())
    message = str(info.value)
    assert f"data.root[1] ('{twin}') and data.root[0] ('{tiny}') are the same dataset" in message
    assert "count twice" in message


# ------------------------------------------------------ item 7: presets by exact name
def test_a_file_named_like_a_preset_is_that_file(tmp_path: Path) -> None:
    impostor = tmp_path / "elsewhere" / "configs" / "demo.py"
    impostor.parent.mkdir(parents=True)
    impostor.write_text("raise SystemExit('this file must not be mistaken for the preset')\n")
    with pytest.raises(ConfigError, match=r"is a file, not a preset .* \.json or \.toml"):
        load_config(str(impostor))


@pytest.mark.parametrize(
    "spec",
    [
        "demo",
        "configs/demo",
        "configs/demo.py",
        "./configs/demo",
        "configs/presets/demo.py",
        str(ROOT / "configs" / "presets" / "demo.py"),
    ],
)
def test_documented_preset_spellings_still_work(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert load_config(spec).name == load_config("demo").name


# -------------------------------------------- item 12: data files changing under a run
def _copy(tiny: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    return data


def test_data_file_truncated_between_epochs_is_named(tiny: Path, tmp_path: Path) -> None:
    from datasets.discovery import open_dataset
    from datasets.loader import FaceLoader

    data = _copy(tiny, tmp_path)
    size = (data / "train.rec").stat().st_size
    loader = FaceLoader(open_dataset(data), batch_size=6, rank=0, world_size=1, num_workers=0)
    loader.set_epoch(0)
    os.truncate(data / "train.rec", 1000)
    with pytest.raises(DataError) as info:
        loader.set_epoch(1)
    assert f"{data / 'train.rec'} changed during the run: size {size} -> 1000 bytes" in str(
        info.value
    )


def test_data_file_truncated_under_a_loader_worker_is_named(tiny: Path, tmp_path: Path) -> None:
    """The worker dies of SIGBUS reading the memory-mapped ``.rec``: the training
    process names the file instead of torch's ``worker exited unexpectedly``."""
    from datasets.discovery import open_dataset
    from datasets.loader import FaceLoader

    data = _copy(tiny, tmp_path)
    loader = FaceLoader(
        open_dataset(data), batch_size=2, rank=0, world_size=1, num_workers=1, prefetch_factor=1
    )
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)
    os.truncate(data / "train.rec", 1000)
    with pytest.raises(DataError, match=r"train\.rec changed during the run: size \d+ -> 1000"):
        for _ in batches:
            pass


def test_training_stops_with_one_line_naming_the_changed_file(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasets.loader import FaceLoader

    data = _copy(tiny, tmp_path)
    real = FaceLoader.set_epoch

    def truncate_after_epoch_0(self: FaceLoader, epoch: int) -> None:
        if epoch == 1:
            os.truncate(data / "train.rec", 1000)
        real(self, epoch)

    monkeypatch.setattr(FaceLoader, "set_epoch", truncate_after_epoch_0)
    code, _, err = _main(_args(data, tmp_path / "run", "train.epochs=2"))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error (rank 0): "), err
    assert f"{data / 'train.rec'} changed during the run: size" in lines[0]


# ------------------------------------------------ item 14: non-finite init weights
def test_non_finite_init_from_weights_name_the_file_and_key(tmp_path: Path) -> None:
    cfg = load_config("demo")
    backbone = build_backbone(cfg)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[key][0] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        load_init_weights(backbone, str(path))
    assert str(info.value).startswith(f"model.init_from: {path} holds NaN/Inf values in {key!r}")
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


# ------------------------------------------------------------------ one error path
def test_error_classes_are_user_errors() -> None:
    from datasets.recordio import RecordIOError

    for cls in (CheckpointError, TrainingError, DataError, RecordIOError):
        assert issubclass(cls, UserError)
    assert issubclass(ConfigError, UsageError) and ConfigError.exit_code == 2
    assert issubclass(DataError, ValueError) and issubclass(CheckpointError, RuntimeError)


def test_commands_report_an_os_error_as_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    done = subprocess.run(
        [sys.executable, "-m", "trainer.report", str(missing)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"trainer.report: error: {missing / 'verification.json'}: No such file or directory"
    ]


def test_arrow_shards_command_reports_a_missing_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.rec"
    argv = ["rec2arrow", str(missing), str(tmp_path / "out")]
    assert run_main(arrow_main, argv, prog="datasets.arrow_shards") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("datasets.arrow_shards: error: ") and str(missing) in err
    assert len(err.splitlines()) == 1
