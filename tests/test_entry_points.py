"""One error path for every command (issue 24): each ``python -m`` entry point and
``train_dist.py`` turns an expected failure (a missing or garbage file, a directory
where a file belongs, a bad option) into one line on stderr with exit code 1 or 2;
only a bug prints a traceback.

The table runs each command's ``main`` in-process through :func:`common.cli.run_main`,
as its ``__main__`` block does (checked separately, over every module that has one).
"""

from __future__ import annotations

import ast
import importlib
import zipfile
from pathlib import Path

import pytest

from common.cli import run_main

ROOT = Path(__file__).resolve().parent.parent
COMMAND_SOURCES = ("datasets", "eval", "trainer", "tools", "backbones", "configs", "partial_fc")


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Unlucky inputs: nothing, an empty file, a zip and text where models/data belong."""
    root = tmp_path_factory.mktemp("bad")
    files = {
        "missing": root / "missing",
        "empty_onnx": root / "empty.onnx",
        "zip_onnx": root / "zip.onnx",
        "text_bin": root / "pairs.bin",
        "text_pt": root / "weights.pt",
        "text_rec": root / "train.rec",
        "a_file": root / "a_file",
        "photo_dir": root / "photos",
        "photo": root / "photos" / "a.jpg",
    }
    files["empty_onnx"].write_bytes(b"")
    with zipfile.ZipFile(files["zip_onnx"], "w") as z:
        z.writestr("hello.txt", "not a model")
    for key in ("text_bin", "text_pt", "text_rec", "a_file"):
        files[key].write_text("this is not what the command expects\n")
    files["photo_dir"].mkdir()
    files["photo"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return files


#: (module, argv template, expected exit code); ``{name}`` is a path from ``bad``.
CASES = [
    ("train_dist", ["{missing}.json"], 2),
    ("train_dist", ["configs/demo", "train.output={a_file}"], 1),
    ("train_dist", ["configs/demo", "optimizer.lr=fast"], 2),
    ("datasets.prepare", ["{missing}", "{missing}_out"], 2),
    ("datasets.prepare", ["{photo_dir}", "{a_file}"], 2),
    ("datasets.synthetic", ["{a_file}", "--identities", "2"], 1),
    ("datasets.arrow_shards", ["rec2arrow", "{missing}.rec", "{missing}_arrow"], 1),
    ("datasets.arrow_shards", ["rec2arrow", "{text_rec}", "{missing}_arrow2"], 1),
    ("eval.compare", ["--model", "{empty_onnx}", "{photo}", "{photo}"], 1),
    ("eval.compare", ["--model", "{zip_onnx}", "{photo}", "{photo}"], 1),
    ("eval.compare", ["--model", "{text_pt}", "--network", "mbf_tiny", "{photo}", "{photo}"], 1),
    ("eval.embed", ["--model", "{empty_onnx}", "--out", "{missing}.parquet", "{photo_dir}"], 1),
    ("eval.verification", ["--onnx", "{zip_onnx}", "--bin", "{text_bin}"], 1),
    ("eval.verification", ["--onnx", "{missing}.onnx", "--bin", "{text_bin}"], 1),
    ("eval.ijb", ["--root", "{missing}", "--onnx", "{zip_onnx}", "--output-dir", "{missing}_o"], 1),
    (
        "eval.export_onnx",
        ["--network", "mbf_tiny", "--checkpoint", "{text_pt}", "--output", "{missing}.onnx"],
        1,
    ),
    ("eval.export", ["{missing}", "--out", "{missing}_model"], 1),
    ("eval.export", ["{text_pt}", "--out", "{missing}_model"], 2),
    ("eval.export", ["{text_pt}", "--network", "mbf_tiny", "--out", "{missing}_model"], 1),
    ("eval.export", ["{photo_dir}", "--out", "{missing}_model"], 1),
    ("eval.make_bin", ["{missing}", "--out", "{missing}.bin", "--pairs", "20"], 1),
    ("eval.make_bin", ["{photo_dir}", "--out", "{a_file}", "--pairs", "20"], 2),
    ("eval.calibrate", ["--model", "{zip_onnx}", "--bin", "{text_bin}", "--far", "1e-3"], 1),
    ("eval.search", ["{text_pt}", "{photo_dir}", "--top-k", "5"], 2),
    ("eval.search", ["{missing}.parquet", "{photo_dir}"], 2),
    ("trainer.report", ["{missing}"], 1),
    (
        "tools.subcenter_cleaning",
        [
            "--head-weights",
            "{missing}.pt",
            "--data",
            "{missing}",
            "--network",
            "mbf_tiny",
            "--output",
            "{missing}_clean",
        ],
        2,
    ),
    ("backbones", ["--list", "no_such_network"], 2),
    ("tools.slurm", ["configs/demo", "--nodes", "0"], 2),
    ("tools.slurm", ["configs/demo", "--out", "{missing}/job.sbatch"], 1),
]


@pytest.mark.parametrize(
    ("module", "argv", "code"), CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)]
)
def test_expected_failures_are_one_line(
    module: str,
    argv: list[str],
    code: int,
    bad: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    main = importlib.import_module("backbones.__main__" if module == "backbones" else module).main
    args = [a.format(**{k: str(v) for k, v in bad.items()}) for a in argv]
    try:
        assert run_main(main, args, prog=module) == code
    except SystemExit as exc:  # argparse's own usage errors: usage line, then the error
        assert exc.code == code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    # progress lines may come first ("rank 0 of 1 on cpu"); the failure is the last line
    assert [line for line in lines if "error" in line] == lines[-1:], err


def _main_block_calls(tree: ast.Module) -> list[str]:
    """Names called inside ``if __name__ == "__main__":`` blocks."""
    calls: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call):
                    f = sub.func
                    calls.append(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return calls


def main_blocks_without_run_main(paths: list[Path]) -> list[str]:
    offenders = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        calls = _main_block_calls(tree)
        if calls and "run_main" not in calls:
            offenders.append(str(path.relative_to(ROOT)))
    return offenders


def test_every_command_exits_through_run_main() -> None:
    paths = [ROOT / "train_dist.py"]
    for package in COMMAND_SOURCES:
        paths += sorted((ROOT / package).rglob("*.py"))
    assert not main_blocks_without_run_main(paths)


def test_the_run_main_check_sees_a_bare_main(tmp_path: Path) -> None:
    bare = tmp_path / "bare.py"
    bare.write_text('import sys\nif __name__ == "__main__":\n    sys.exit(main())\n')
    good = tmp_path / "good.py"
    good.write_text('import sys\nif __name__ == "__main__":\n    sys.exit(run_main(main))\n')
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert main_blocks_without_run_main([bare, good]) == ["bare.py"]
    finally:
        ROOT = saved
