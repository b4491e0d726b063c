"""``--help`` answers fast (issue 27): no ``python -m`` command of the project imports
torch or OpenCV before its arguments are parsed.

A command module is light (argparse and its ``main``); its heavy imports happen inside
``main`` after parsing, and the functions other modules import live in library modules.
The test runs every command as ``python -m MOD --help`` would (``runpy`` with
``sys.argv`` set), in one subprocess that forks once per command, and lists the heavy
modules found in ``sys.modules`` when argparse exits. Deterministic: no timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.test_entry_points import COMMAND_SOURCES, ROOT

#: Top-level packages a command must not import before its arguments are parsed.
HEAVY = ("torch", "cv2")

#: Forks once per command: the child runs it with ``--help`` and reports the heavy
#: modules loaded when argparse exits; the parent prints ``{module: [heavy, ...]}``.
RUNNER = textwrap.dedent(
    """
    import io, json, os, runpy, sys
    heavy, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {}
    for mod in modules:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            sys.argv = [mod, "--help"]
            sys.stdout = io.StringIO()
            loaded = ["<no SystemExit>"]
            try:
                runpy.run_module(mod, run_name="__main__", alter_sys=True)
            except SystemExit:
                loaded = [h for h in heavy if h in sys.modules]
            except BaseException as exc:
                loaded = [f"<{type(exc).__name__}: {exc}>"]
            os.write(w, json.dumps(loaded).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out[mod] = json.loads(f.read() or '["<no report>"]')
        os.waitpid(pid, 0)
    print(json.dumps(out))
    """
)


def command_modules(root: Path = ROOT) -> list[str]:
    """Every ``python -m`` command of the project: each module of ``COMMAND_SOURCES``
    with an ``if __name__ == "__main__":`` block (a package's ``__main__.py`` is the
    package), found in the source tree as ``tests/test_entry_points.py`` finds them."""
    found = []
    for package in COMMAND_SOURCES:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text()
            if 'if __name__ == "__main__":' not in text or path.name == "cli.py":
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__main__":
                parts.pop()
            found.append(".".join(parts))
    return found


def heavy_imports_at_help(modules: list[str]) -> dict[str, list[str]]:
    """``{module: heavy modules loaded when its --help exits}``, in one subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(HEAVY), json.dumps(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_commands_are_found() -> None:
    modules = command_modules()
    for mod in ("eval.embed", "eval.verification", "datasets.prepare", "backbones"):
        assert mod in modules
    assert not any(m.startswith(("tests", "bench")) for m in modules)


def test_help_imports_neither_torch_nor_cv2() -> None:
    found = heavy_imports_at_help(command_modules())
    assert {mod: heavy for mod, heavy in found.items() if heavy} == {}


def test_the_check_sees_a_heavy_import(tmp_path: Path) -> None:
    """A command that imports ``json`` (standing in for torch) before parsing is caught;
    one that imports it inside ``main`` after parsing is not."""
    pkg = tmp_path / "startup_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    main = (
        "import argparse, sys\n{top}\n"
        "def main(argv=None):\n"
        "    argparse.ArgumentParser().parse_args(argv)\n"
        "    import {mod}\n"
        'if __name__ == "__main__":\n'
        "    main()\n"
    )
    (pkg / "eager.py").write_text(main.format(top="import wave", mod="wave"))
    (pkg / "lazy.py").write_text(main.format(top="", mod="wave"))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            json.dumps(["wave"]),
            json.dumps(["startup_probe.eager", "startup_probe.lazy"]),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(proc.stdout) == {"startup_probe.eager": ["wave"], "startup_probe.lazy": []}
