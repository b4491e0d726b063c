"""tools.mutation: which statement removals it generates.

Removing a ``return None`` after which the function would fall off its end anyway is an
equivalent mutant by construction, so none is generated; removing an early one changes
what the function does, so it is generated.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tools.mutation import mutants_of

SOURCE = """
def tail(x):
    if x:
        return 1
    return None


def in_handler(path):
    try:
        return path.stat()
    except OSError:
        return None


def in_both_branches(x):
    if x:
        y = 1
        return None
    else:
        return


def early(x):
    if x is None:
        return None
    x.append(1)


def early_bare(x):
    for item in x:
        if item:
            return
    x.append(1)


def try_with_else(x):
    try:
        y = int(x)
    except ValueError:
        return None
    else:
        return
"""


def _removed_returns(tmp_path: Path) -> list[tuple[str, int]]:
    (tmp_path / "m.py").write_text(textwrap.dedent(SOURCE))
    lines = textwrap.dedent(SOURCE).splitlines()
    return [
        (m.scope, m.line)
        for m in mutants_of("m.py", root=tmp_path)
        if m.op == "remove statement" and lines[m.line - 1].strip().startswith("return")
    ]


def test_only_early_returns_of_none_are_removed(tmp_path: Path) -> None:
    removed = _removed_returns(tmp_path)
    scopes = [scope for scope, _ in removed]
    # a return of a value is always a mutant; of None only where control would go on
    assert scopes.count("tail") == 1  # `return 1`
    assert scopes.count("in_handler") == 1  # `return path.stat()`
    assert "in_both_branches" not in scopes
    assert scopes.count("early") == 1
    assert scopes.count("early_bare") == 1
    # the try's body falls into its else, so only the handler's and the else's are tails
    assert "try_with_else" not in scopes


def test_the_budget_is_shared_equally_among_packages() -> None:
    """A package of slow tests gets as much time as one of fast tests (its kill rate is
    a figure of its own); within a package, time follows the modules' mutant counts."""
    from tools.mutation import Module, ModuleRun, allocate

    def run(path: str, package: str, mutants: int, seconds: float) -> ModuleRun:
        return ModuleRun(Module(path, package, []), [None] * mutants, baseline_s=seconds)

    fast_a = run("a.py", "fast", 3000, 1.0)
    fast_b = run("b.py", "fast", 1000, 1.0)
    slow = run("c.py", "slow", 600, 10.0)
    extra = allocate([fast_a, fast_b, slow], 800.0, None)
    assert (extra[id(fast_a)], extra[id(fast_b)], extra[id(slow)]) == (300, 100, 40)


def test_constant_statements_are_not_removed(tmp_path: Path) -> None:
    """A docstring or a Protocol method's ``...`` does nothing: no mutant removes it."""
    (tmp_path / "p.py").write_text(
        'class P:\n    def f(self) -> int: ...\n\n    def g(self):\n        """Doc."""\n'
        "        return 1\n"
    )
    removed = [
        m.source_line for m in mutants_of("p.py", root=tmp_path) if m.op == "remove statement"
    ]
    assert removed == ["return 1"]


def test_a_rerun_finds_each_survivor_once_after_its_line_moved(tmp_path: Path) -> None:
    """The same line text in two functions: only the survivor's own mutant runs again,
    also after lines were added above it."""
    import json
    from dataclasses import asdict

    from tools.mutation import Module, ModuleRun, _survivors_of

    body = "def f(x):\n    return x + 1\n\n\ndef g(x):\n    return x + 1\n"
    (tmp_path / "m.py").write_text(body)
    survivor = next(
        m for m in mutants_of("m.py", root=tmp_path) if m.scope == "g" and m.op == "+ -> -"
    )
    report = tmp_path / "report.json"
    result = {"mutant": asdict(survivor), "status": "survived"}
    report.write_text(json.dumps({"results": [result]}))
    (tmp_path / "m.py").write_text("import os\n\n\n" + body)  # the lines moved
    run = ModuleRun(Module("m.py", "p", []), mutants_of("m.py", root=tmp_path))
    [found] = _survivors_of(report, [run])
    assert [(m.scope, m.op, m.line) for m in found.mutants] == [("g", "+ -> -", survivor.line + 3)]
