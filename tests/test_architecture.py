"""The import contract (``pyproject.toml``'s ``[tool.importlinter]``, docs/architecture.md).

* Packages import only from the layers below them, and ``partial_fc``, ``backbones``
  and ``datasets`` not from each other: import-linter's ``layers`` contract.
* No import cycle between the modules of a package: its ``acyclic_siblings`` contract.
* Inside ``datasets``, the data formats import neither ``datasets.faces`` (face finding)
  nor ``datasets.prepare``: a ``layers`` contract with ``datasets`` as container.
* An import of our own code inside a function is there only in a command's ``main``
  (after its arguments are parsed, so that ``--help`` stays fast) or in the command
  packages (``tools``, ``bench``): never to dodge a cycle. Optional heavy dependencies
  (triton, onnxruntime, tensorboard, matplotlib) are not ours and stay lazy; so does
  ``partial_fc.triton_ce``, which imports triton (:data:`LAZY_IMPORTS`).

Each check is shown to fail on a planted violation.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("common", "partial_fc", "backbones", "datasets", "eval", "configs", "trainer")
COMMAND_PACKAGES = ("tools", "bench")
#: Modules of ours that may be imported inside a function, and why.
LAZY_IMPORTS = {
    "partial_fc.triton_ce": "imports triton, an optional heavy dependency that only a head "
    "running the triton backend needs (partial_fc.backend checks for it without importing it)",
}
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_import_contract_is_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def _copy_tree(dest: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", dest)
    for package in (*OURS, *COMMAND_PACKAGES):
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("partial_fc/planted.py", "import trainer.loop\n", "partial_fc is not allowed to import"),
        ("datasets/planted.py", "from backbones import registry\n", "not allowed to import"),
        (
            "datasets/recordio.py",
            "from datasets.faces.finder import FaceFinder\n",
            "datasets.recordio is not allowed to import datasets.faces",
        ),
        (
            "datasets/recordio_planted.py",
            "import datasets.planted_b\n",
            "No cycles are allowed in datasets",
        ),
    ],
)
def test_the_contract_catches_planted_violations(
    tmp_path: Path, module: str, source: str, expected: str
) -> None:
    _copy_tree(tmp_path)
    (tmp_path / module).write_text(source)
    if "cycle" in expected.lower():
        (tmp_path / "datasets/planted_b.py").write_text("import datasets.recordio_planted\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout[-3000:]


def function_local_imports(path: Path) -> list[str]:
    """Imports of our packages inside functions other than a command's ``main``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []

    def ours(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.ImportFrom):
            names = [("." * node.level) + (node.module or "")]
        else:
            names = [alias.name for alias in node.names]
        return [
            n
            for n in names
            if (n.startswith(".") or n.split(".")[0] in OURS) and n not in LAZY_IMPORTS
        ]

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name if function is None else function)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                if function is not None and function != "main":
                    found.extend(f"{path}:{child.lineno} {function}: {n}" for n in ours(child))
            else:
                visit(child, function)

    visit(tree, None)
    return found


def test_imports_inside_functions_are_only_in_commands() -> None:
    offenders = [
        line
        for package in OURS
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in function_local_imports(path)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_function_import_check_sees_a_lazy_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def helper():\n    from trainer.checkpoint import x\n"
        "def main():\n    from trainer.loop import Trainer\n"
        "def lazy_heavy():\n    import onnxruntime\n"
        "def kernels():\n    from partial_fc.triton_ce import fused_forward\n"
    )
    assert function_local_imports(probe) == [f"{probe}:2 helper: trainer.checkpoint"]
