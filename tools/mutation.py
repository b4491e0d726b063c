"""A small mutation-testing runner: plant one bug at a time, run the tests that cover it.

    .venv/bin/python -m tools.mutation                      # the run `make mutation` does
    .venv/bin/python -m tools.mutation --list               # the mutants, nothing run
    .venv/bin/python -m tools.mutation --modules eval/metrics.py --budget-minutes 5
    .venv/bin/python -m tools.mutation --planted mutation/planted.toml   # hand-planted bugs
    .venv/bin/python -m tools.mutation --rerun work_dirs/mutation/report.json  # survivors again

Mutants are made from each module's syntax tree, one change each:

* comparisons flipped at their boundary or negated (``<`` <-> ``<=``, ``>`` <-> ``>=``,
  ``==`` <-> ``!=``, ``in`` <-> ``not in``, ``is`` <-> ``is not``);
* arithmetic swapped (``+`` <-> ``-``, ``*`` <-> ``/``, ``//`` -> ``/``, ``**`` -> ``*``,
  ``<<`` <-> ``>>``, ``&`` <-> ``|``, ``^`` -> ``&``), in expressions and ``op=``;
* integer and float constants plus one, booleans negated;
* ``and`` <-> ``or``; a ``not`` or a unary minus removed;
* a statement inside a function removed (an expression statement, an assignment, a
  ``return``, a ``raise``).

Left alone, because a change there is not a change of behaviour worth a test: strings and
f-strings, docstrings, annotations, decorators, ``assert`` statements, logging and
``print`` calls, ``__repr__``/``__str__``/``extra_repr``, and whatever sits inside a
``raise`` (its message).

Each mutant is written into a private copy of the working tree (``git ls-files``: tracked
and untracked-but-not-ignored files), and the tests mapped to its module
(``mutation/config.toml``) run there with ``pytest -x``: a failure, an error or a timeout
kills it; passing tests let it survive. A fork server that has already imported torch and
the other heavy third-party modules starts each run, so a mutant costs its tests, not an
interpreter start. The mapped tests first run once unmutated (they must pass; their time
sets the timeout and the budget).

Budget: the mutants of every module are shuffled (seeded); the run takes them in that
order, in rounds, until ``--budget-minutes`` (baselines included) are spent. Each round
shares the time left among the modules in proportion to their mutant counts, at each
module's measured cost per mutant (water-filling: what a module with few or fast mutants
leaves goes to the others). So the mutants run are a seeded random sample of each module,
larger for modules with fast tests; the report says how many ran out of how many.

Survivors judged equivalent (no test could tell them apart from the original) are listed
with the reason in ``mutation/equivalent.toml``, matched by module, operator and the
text of the source line; the kill rate is given with and without them.

Output: a table per package on stdout, the survivors, and ``report.json`` /
``report.md`` in ``--out`` (default ``work_dirs/mutation``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.cli import run_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "mutation" / "config.toml"
DEFAULT_EQUIVALENT = ROOT / "mutation" / "equivalent.toml"

_COMPARE = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip
_BINARY = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd,
}  # fmt: skip
_SYMBOL = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+",
    ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**",
    ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^",
    ast.And: "and", ast.Or: "or",
}  # fmt: skip
_LOGGERS = {"log", "logger", "logging", "warnings", "_log", "LOG"}
# Methods that only describe an object to people (printed, never computed with).
_DESCRIPTIONS = {"__repr__", "__str__", "extra_repr"}
# Third-party modules the fork server imports once (never the project's own, never
# triton: its interpreter mode must be chosen before the first import).
_PRELOAD = ("numpy", "torch", "pytest", "hypothesis", "cv2", "pyarrow", "onnx", "scipy")


# ----------------------------------------------------------------------------- mutants
@dataclass
class Mutant:
    path: str  # relative to the project root
    line: int
    col: int
    op: str  # e.g. "< -> <=", "const 3 -> 4", "remove statement"
    start: int  # byte span in the file
    end: int
    replacement: str
    source_line: str  # the original line, stripped (for people and for equivalence)
    scope: str = ""  # the enclosing class and function, e.g. "MXRecordIO.close"

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}:{self.col}: {self.op}"

    def apply(self, source: bytes) -> bytes:
        return source[: self.start] + self.replacement.encode() + source[self.end :]


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _returns_none(stmt: ast.stmt) -> bool:
    """``return`` or ``return None``."""
    return isinstance(stmt, ast.Return) and (
        stmt.value is None or (isinstance(stmt.value, ast.Constant) and stmt.value.value is None)
    )


def _tail_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of a function ``body`` after which control leaves the function by
    falling off its end: removing a ``return None`` there is an equivalent mutant by
    construction (the function still returns ``None``), so none is generated. Loop
    bodies are never tails (the loop goes on); a ``try`` body is one only without an
    ``else``."""
    if not body:
        return []
    last = body[-1]
    found = [last]
    if isinstance(last, ast.If):
        found += _tail_statements(last.body) + _tail_statements(last.orelse)
    elif isinstance(last, ast.With | ast.AsyncWith):
        found += _tail_statements(last.body)
    elif isinstance(last, ast.Try):
        found += _tail_statements(last.orelse or last.body)
        for handler in last.handlers:
            found += _tail_statements(handler.body)
    return found


def _is_log_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Name):
        return f.id == "print"
    while isinstance(f, ast.Attribute):
        f = f.value
    return isinstance(f, ast.Name) and f.id in _LOGGERS


class _Collector(ast.NodeVisitor):
    """Walk a module and list every mutation (as a node, a mutated copy, a label)."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.AST, ast.AST | None, str, str]] = []
        self.depth = 0  # inside how many functions
        self.scope: list[str] = []
        self.tail_returns: set[int] = set()  # ids of `return None`s that end a function

    def _add(self, node: ast.AST, new: ast.AST | None, op: str) -> None:
        self.found.append((node, new, op, ".".join(self.scope)))

    # places never mutated
    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return

    def visit_Assert(self, node: ast.Assert) -> None:
        return

    def visit_Raise(self, node: ast.Raise) -> None:
        return  # its message; the raise itself is removed by _statements

    def visit_Call(self, node: ast.Call) -> None:
        if _is_log_call(node):
            return
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        return  # annotations

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.name in _DESCRIPTIONS:
            return
        self.visit(node.args)  # defaults (annotations are skipped in visit_arg)
        self.depth += 1
        self.scope.append(node.name)
        self.tail_returns |= {id(s) for s in _tail_statements(node.body) if _returns_none(s)}
        self._statements(node.body)
        for stmt in node.body:
            self.visit(stmt)
        self.scope.pop()
        self.depth -= 1

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self.scope.pop()

    def visit_Module(self, node: ast.Module) -> None:
        for stmt in node.body:
            if _is_docstring(stmt):
                continue
            if (
                isinstance(stmt, ast.If)
                and isinstance(stmt.test, ast.Name)
                and stmt.test.id == "TYPE_CHECKING"
            ):
                continue
            self.visit(stmt)

    def visit_Expr(self, node: ast.Expr) -> None:
        if _is_docstring(node):
            return
        self.generic_visit(node)

    def _block(self, body: list[ast.stmt]) -> None:
        if self.depth:
            self._statements(body)

    def visit_If(self, node: ast.If) -> None:
        self._block(node.body)
        self._block(node.orelse)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        self._block(node.body)
        self.generic_visit(node)

    visit_While = visit_For

    def visit_With(self, node: ast.With) -> None:
        self._block(node.body)
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        self._block(node.body)
        for handler in node.handlers:
            self._block(handler.body)
        self._block(node.finalbody)
        self.generic_visit(node)

    def _statements(self, body: list[ast.stmt]) -> None:
        kinds = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Raise)
        for stmt in body:
            if not isinstance(stmt, kinds):
                continue
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # a docstring or a Protocol's `...`: removing it changes nothing
            if isinstance(stmt, ast.Expr) and _is_log_call(stmt.value):
                continue
            if isinstance(stmt, ast.AnnAssign) and stmt.value is None:
                continue
            if id(stmt) in self.tail_returns:
                continue
            self._add(stmt, None, "remove statement")

    # the mutations
    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            new = _COMPARE.get(type(op))
            if new is None:
                continue
            copy = ast.Compare(node.left, list(node.ops), node.comparators)
            copy.ops[i] = new()
            self._add(node, copy, f"{_SYMBOL[type(op)]} -> {_SYMBOL[new]}")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        new = _BINARY.get(type(node.op))
        strings = any(
            isinstance(s, ast.JoinedStr)
            or (isinstance(s, ast.Constant) and isinstance(s.value, str | bytes))
            for s in (node.left, node.right)
        )
        if new is not None and not strings:
            copy = ast.BinOp(node.left, new(), node.right)
            self._add(node, copy, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        new = _BINARY.get(type(node.op))
        if new is not None:
            copy = ast.AugAssign(node.target, new(), node.value)
            self._add(node, copy, f"{_SYMBOL[type(node.op)]}= -> {_SYMBOL[new]}=")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        copy = ast.BoolOp(new(), node.values)
        self._add(node, copy, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self._add(node, node.operand, "remove not")
        elif isinstance(node.op, ast.USub):
            self._add(node, node.operand, "remove unary -")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        v = node.value
        if isinstance(v, bool):
            self._add(node, ast.Constant(not v), f"const {v} -> {not v}")
        elif isinstance(v, int | float) and not isinstance(v, complex):
            self._add(node, ast.Constant(v + 1), f"const {v!r} -> {v + 1!r}")


def _line_starts(source: bytes) -> list[int]:
    starts, pos = [0], 0
    for line in source.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def mutants_of(path: str, root: Path = ROOT) -> list[Mutant]:
    """Every mutant of one module, in source order; each one compiles and changes the
    syntax tree."""
    source = (root / path).read_bytes()
    tree = ast.parse(source)
    original = ast.dump(tree)
    lines = source.splitlines()
    starts = _line_starts(source)
    collector = _Collector()
    collector.visit(tree)
    out: list[Mutant] = []
    seen: set[tuple[int, int, str]] = set()
    for node, new, op, scope in collector.found:
        start = starts[node.lineno - 1] + node.col_offset
        end = starts[node.end_lineno - 1] + node.end_col_offset
        if new is None:
            text = "pass"
        else:
            ast.fix_missing_locations(new)
            text = ast.unparse(new)
            if isinstance(node, ast.expr):
                text = f"({text})"
        key = (start, end, text)
        if key in seen:
            continue
        seen.add(key)
        m = Mutant(
            path=path,
            line=node.lineno,
            col=node.col_offset,
            op=op,
            start=start,
            end=end,
            replacement=text,
            source_line=lines[node.lineno - 1].decode("utf-8", "replace").strip(),
            scope=scope,
        )
        mutated = m.apply(source)
        try:
            if ast.dump(ast.parse(mutated)) == original:
                continue
            compile(mutated, path, "exec")
        except (SyntaxError, ValueError):
            continue
        out.append(m)
    return sorted(out, key=lambda m: (m.start, m.end, m.op))


# ----------------------------------------------------------------------------- config
@dataclass
class Module:
    path: str
    package: str
    tests: list[str]


def load_config(path: Path) -> tuple[dict[str, Any], list[Module]]:
    data = tomllib.loads(path.read_text())
    modules = [
        Module(m["path"], m.get("package", m["path"].split("/")[0]), list(m["tests"]))
        for m in data.get("module", [])
    ]
    return data.get("settings", {}), modules


def load_equivalent(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    return list(tomllib.loads(path.read_text()).get("mutant", []))


def equivalence_reason(m: Mutant, equivalent: list[dict[str, str]]) -> str | None:
    """The reason of the entry matching ``m`` by module, operator and line text (and by
    ``scope``, the enclosing class and function, when the entry gives one)."""
    for e in equivalent:
        if e["path"] == m.path and e["op"] == m.op and e["line_text"].strip() == m.source_line:
            if e.get("scope") in (None, m.scope):
                return e["reason"]
    return None


# ------------------------------------------------------------------------ the sandbox
def tree_files(root: Path = ROOT) -> list[str]:
    """The working tree as git sees it: tracked and untracked, not ignored, present."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (root / f).is_file()})


def copy_tree(
    dest: Path, root: Path = ROOT, rev: str | None = None, overlay: list[str] | None = None
) -> None:
    """The working tree (or, with ``rev``, that commit's tree, with the working tree's
    ``overlay`` files copied over it) into ``dest``."""
    if rev is not None:
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", rev], cwd=root, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        for rel in overlay or ():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel)
        return
    for rel in tree_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


class ForkServer:
    """Runs ``pytest`` in a forked child of a process that has already imported the heavy
    third-party modules; ``run`` returns ``(exit code or None on timeout, seconds, log)``."""

    def __init__(self, sandbox: Path, logs: Path) -> None:
        self.sandbox = sandbox
        self.logs = logs
        for name in _PRELOAD:
            with contextlib.suppress(Exception):
                __import__(name)

    def run(self, tests: list[str], timeout: float, tag: str) -> tuple[int | None, float, Path]:
        log = self.logs / f"{tag}.log"
        args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *tests]
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: a new session, so a timeout can kill its ranks too
            code = 3
            try:
                os.setsid()
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(self.sandbox)
                sys.path[:] = [str(self.sandbox)] + [
                    p for p in sys.path if p and Path(p).resolve() not in (ROOT, ROOT / "tools")
                ]
                # the project's own modules this runner imported (tools, common) come from
                # the sandbox from now on, like every other module of the project
                venv = ROOT / ".venv"
                for name, module in list(sys.modules.items()):
                    if name in ("__main__", "__mp_main__"):  # spawned ranks need it
                        continue
                    file = getattr(module, "__file__", None)
                    if file and ROOT in Path(file).resolve().parents:
                        if venv not in Path(file).resolve().parents:
                            del sys.modules[name]
                import pytest

                code = int(pytest.main(args))
            except BaseException:  # report anything, then leave the child
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = start + timeout
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    pid = 0
                    return os.waitstatus_to_exitcode(status), time.monotonic() - start, log
                if time.monotonic() > deadline:
                    return None, time.monotonic() - start, log
                time.sleep(0.05)
        finally:  # a timeout, or this runner stopped: the child and its ranks go too
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


# ----------------------------------------------------------------------------- running
@dataclass
class Result:
    mutant: dict[str, Any]
    package: str
    status: str  # killed | survived | timeout | baseline-failed
    seconds: float
    equivalent: str | None = None


@dataclass
class ModuleRun:
    module: Module
    mutants: list[Mutant]
    baseline_s: float = 0.0
    baseline_ok: bool = True
    order: list[int] = field(default_factory=list)  # a seeded permutation of the mutants
    times: list[float] = field(default_factory=list)  # seconds of each mutant run so far

    @property
    def sampled(self) -> list[Mutant]:
        return [self.mutants[i] for i in self.order[: len(self.times)]]

    @property
    def cost(self) -> float:
        """Expected seconds of the next mutant: the mean so far, else the baseline."""
        if self.times:
            return max(sum(self.times) / len(self.times), 0.2)
        return max(self.baseline_s, 0.2)


def allocate(runs: list[ModuleRun], budget_s: float, cap: int | None) -> dict[int, int]:
    """How many more mutants each module runs: water-filling of ``budget_s``, an equal
    share for each package (its kill rate is the figure reported, so a package of slow
    tests still gets a sample worth the name), shared among the package's modules in
    proportion to their mutant counts, at each module's expected cost."""

    def left_of(r: ModuleRun) -> int:
        n = len(r.mutants) if cap is None else min(cap, len(r.mutants))
        return n - len(r.times) - extra[id(r)]

    extra = {id(r): 0 for r in runs}
    pending = [r for r in runs if r.baseline_ok and left_of(r) > 0]
    left = budget_s
    while pending and left > 0:
        in_package: dict[str, int] = {}
        for r in pending:
            in_package[r.module.package] = in_package.get(r.module.package, 0) + len(r.mutants)
        spent = 0.0
        for r in pending:
            share = len(r.mutants) / in_package[r.module.package] / len(in_package)
            n = min(left_of(r), int(left * share // r.cost))
            extra[id(r)] += n
            spent += n * r.cost
        if spent == 0:  # no whole mutant fits any share: give the cheapest one its next
            cheapest = min(pending, key=lambda r: r.cost)
            if cheapest.cost > left:
                break
            extra[id(cheapest)] += 1
            spent = cheapest.cost
        left -= spent
        pending = [r for r in pending if left_of(r) > 0]
    return extra


def run_mutants(args: argparse.Namespace, runs: list[ModuleRun]) -> list[Result]:
    """Baselines, then rounds: each round shares the time left among the modules
    (:func:`allocate`, with the costs measured so far) and runs the next mutants of each
    module's seeded permutation, until the budget is spent or every mutant has run."""
    equivalent = load_equivalent(Path(args.equivalent))
    out = Path(args.out)
    logs = out / "logs"
    shutil.rmtree(out, ignore_errors=True)
    logs.mkdir(parents=True)
    results: list[Result] = []
    for r in runs:
        r.order = list(range(len(r.mutants)))
        random.Random(f"{args.seed}:{r.module.path}").shuffle(r.order)
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        sandbox = Path(tmp) / "tree"
        copy_tree(sandbox, rev=args.rev, overlay=args.overlay)
        server = ForkServer(sandbox, logs)
        deadline = time.monotonic() + args.budget_minutes * 60
        baselines: dict[tuple[str, ...], tuple[int | None, float, Path]] = {}
        for r in runs:  # baselines: the mapped tests pass unmutated (once per test list)
            key = tuple(r.module.tests)
            if key not in baselines:
                baselines[key] = server.run(r.module.tests, args.baseline_timeout, _tag(r, "base"))
            code, seconds, log = baselines[key]
            r.baseline_s, r.baseline_ok = seconds, code == 0
            print(
                f"baseline {r.module.path}: {len(r.mutants)} mutants, tests "
                f"{'pass' if r.baseline_ok else f'FAIL (exit {code}, {log})'} in {seconds:.1f} s",
                flush=True,
            )
        rounds = 0
        while time.monotonic() < deadline:
            extra = allocate(runs, deadline - time.monotonic(), args.max_mutants)
            if not any(extra.values()):
                break
            rounds += 1
            print(f"round {rounds}: {sum(extra.values())} mutants", flush=True)
            for r in runs:
                if extra[id(r)] and time.monotonic() < deadline:
                    _run_module(args, server, sandbox, r, extra[id(r)], deadline, equivalent,
                                results)  # fmt: skip
    return results


def _run_module(args, server, sandbox, r, count, deadline, equivalent, results) -> None:
    target = sandbox / r.module.path
    original = target.read_bytes()
    timeout = max(args.timeout_factor * r.baseline_s, args.timeout_floor)
    try:
        for _ in range(count):
            if time.monotonic() >= deadline:
                break
            m = r.mutants[r.order[len(r.times)]]
            target.write_bytes(m.apply(original))
            code, seconds, log = server.run(r.module.tests, timeout, _tag(r, m))
            r.times.append(seconds)
            status = "timeout" if code is None else "survived" if code == 0 else "killed"
            reason = equivalence_reason(m, equivalent) if status == "survived" else None
            results.append(Result(asdict(m), r.module.package, status, seconds, reason))
            mark = {"killed": ".", "timeout": "T", "survived": "S"}[status]
            print(
                f"[{len(results)}] {mark} {m.id} ({seconds:.1f} s)"
                + (f"  `{m.source_line}`" if status == "survived" else ""),
                flush=True,
            )
            if status != "survived":
                log.unlink(missing_ok=True)
    finally:
        target.write_bytes(original)


def _tag(r: ModuleRun, what: Any) -> str:
    name = r.module.path.replace("/", "_").removesuffix(".py")
    if isinstance(what, Mutant):
        digest = hashlib.sha1(what.id.encode()).hexdigest()[:8]
        return f"{name}-{what.line}-{digest}"
    return f"{name}-{what}"


def report(args: argparse.Namespace, runs: list[ModuleRun], results: list[Result]) -> int:
    packages: dict[str, dict[str, int]] = {}
    for r in runs:
        p = packages.setdefault(
            r.module.package,
            {"generated": 0, "sampled": 0, "killed": 0, "timeout": 0, "survived": 0, "equiv": 0},
        )
        p["generated"] += len(r.mutants)
        p["sampled"] += len(r.sampled)
    for res in results:
        p = packages[res.package]
        p[res.status] += 1
        if res.equivalent:
            p["equiv"] += 1
    lines = [
        "| package | mutants | run | killed | timeout | survived | of which equivalent "
        "| kill rate | excl. equivalent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in packages.items():
        dead = p["killed"] + p["timeout"]
        runnable = dead + p["survived"]
        rate = f"{100 * dead / runnable:.0f}%" if runnable else "-"
        strict = runnable - p["equiv"]
        rate2 = f"{100 * dead / strict:.0f}%" if strict else "-"
        lines.append(
            f"| {name} | {p['generated']} | {p['sampled']} | {p['killed']} | {p['timeout']} | "
            f"{p['survived']} | {p['equiv']} | {rate} | {rate2} |"
        )
    lines += [
        "",
        "| module | mutants | run | killed | survived | s per mutant |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        mine = [res for res in results if res.mutant["path"] == r.module.path]
        dead = sum(res.status != "survived" for res in mine)
        per = f"{sum(r.times) / len(r.times):.1f}" if r.times else "-"
        lines.append(
            f"| {r.module.path} | {len(r.mutants)} | {len(mine)} | {dead} | "
            f"{len(mine) - dead} | {per} |"
        )
    survivors = sorted(
        (res for res in results if res.status == "survived"),
        key=lambda res: (res.mutant["path"], res.mutant["line"], res.mutant["col"]),
    )
    lines += ["", f"Survivors ({len(survivors)}):", ""]
    for res in survivors:
        m = res.mutant
        note = f" — equivalent: {res.equivalent}" if res.equivalent else ""
        lines.append(
            f"- `{m['path']}:{m['line']}` {m['op']}: `{m['source_line']}` -> "
            f"`{m['replacement']}`{note}"
        )
    failed = [r.module.path for r in runs if not r.baseline_ok]
    if failed:
        lines += ["", f"Modules skipped, their tests fail unmutated: {', '.join(failed)}"]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {
                "packages": packages,
                "results": [asdict(r) for r in results],
                "modules": [
                    {
                        "path": r.module.path,
                        "mutants": len(r.mutants),
                        "sampled": len(r.sampled),
                        "baseline_s": round(r.baseline_s, 1),
                        "baseline_ok": r.baseline_ok,
                    }
                    for r in runs
                ],
            },
            indent=1,
        )
    )
    print(f"\nreport: {out / 'report.md'}, {out / 'report.json'}; survivors' logs in {out}/logs")
    return 0


# ------------------------------------------------------------------------ planted bugs
def run_planted(args: argparse.Namespace) -> int:
    """Apply each ``[[bug]]`` of the file (exact text ``old`` -> ``new``, which must occur
    once) alone, run its tests, and say whether they caught it; the tests must pass on
    the unmutated tree first."""
    bugs = tomllib.loads(Path(args.planted).read_text())["bug"]
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        sandbox = Path(tmp) / "tree"
        copy_tree(sandbox, rev=args.rev, overlay=args.overlay)
        server = ForkServer(sandbox, logs)
        for bug in bugs:
            target = sandbox / bug["path"]
            original = target.read_bytes()
            text = original.decode()
            count = text.count(bug["old"])
            if count != 1:
                rows.append((bug["name"], "-", f"old text found {count} times", bug["tests"]))
                continue
            tag = bug["name"].replace(" ", "_")
            clean, s0, _ = server.run(bug["tests"], args.baseline_timeout, f"{tag}-clean")
            try:
                target.write_text(text.replace(bug["old"], bug["new"]))
                buggy, s1, _ = server.run(bug["tests"], args.baseline_timeout, f"{tag}-bug")
            finally:
                target.write_bytes(original)
            without = "pass" if clean == 0 else f"FAIL ({clean})"
            with_bug = "pass (SURVIVED)" if buggy == 0 else ("timeout" if buggy is None else "fail")
            rows.append((bug["name"], without, with_bug, bug["tests"]))
            print(f"{bug['name']}: without the bug {without} ({s0:.0f} s), with it {with_bug} "
                  f"({s1:.0f} s)", flush=True)  # fmt: skip
    lines = ["| planted bug | tests | without the bug | with the bug |", "|---|---|---|---|"]
    for name, without, with_bug, tests in rows:
        lines.append(f"| {name} | {'<br>'.join(tests)} | {without} | {with_bug} |")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "planted.md").write_text(text + "\n")
    caught = all(r[1] == "pass" and r[2] in ("fail", "timeout") for r in rows)
    return 0 if caught else 1


def _survivors_of(report_json: Path, runs: list[ModuleRun]) -> list[ModuleRun]:
    """Only the mutants that survived in an earlier report (found again by module,
    operator, source line, replacement, enclosing function and column, so they survive
    line moves and a line text that repeats elsewhere is not run again): to check that
    new tests kill them."""
    key = lambda d: (d["path"], d["op"], d["source_line"], d["replacement"], d["scope"], d["col"])  # noqa: E731
    wanted = {
        key(r["mutant"]) for r in json.loads(report_json.read_text())["results"]
        if r["status"] == "survived"
    }  # fmt: skip
    found = set()
    for r in runs:
        r.mutants = [m for m in r.mutants if key(asdict(m)) in wanted]
        found |= {key(asdict(m)) for m in r.mutants}
    for gone in sorted(wanted - found):
        print(f"not found any more (its line changed): {gone[0]}: {gone[1]} `{gone[2]}`")
    return [r for r in runs if r.mutants]


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--equivalent", default=str(DEFAULT_EQUIVALENT))
    parser.add_argument("--modules", nargs="*", help="only these module paths")
    parser.add_argument("--packages", nargs="*", help="only these packages of the config")
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--max-mutants", type=int, default=None, help="per module, at most")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout-factor", type=float, default=None)
    parser.add_argument("--timeout-floor", type=float, default=None)
    parser.add_argument("--baseline-timeout", type=float, default=600.0)
    parser.add_argument("--out", default=str(ROOT / "work_dirs" / "mutation"))
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument(
        "--rev", help="mutate this commit's tree (git archive) instead of the working tree"
    )
    parser.add_argument(
        "--overlay", nargs="*", default=[], help="with --rev: working-tree files copied over it"
    )
    parser.add_argument("--planted", help="a TOML file of hand-planted bugs to check instead")
    parser.add_argument(
        "--rerun", help="a report.json: run only its survivors again (all of them by default)"
    )
    args = parser.parse_args(argv)
    # SIGTERM (a killed make) unwinds like Ctrl-C: the sandbox copy is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.planted:
        return run_planted(args)
    settings, modules = load_config(Path(args.config))
    for name, default in (
        ("budget_minutes", 30.0),
        ("seed", 0),
        ("timeout_factor", 3.0),
        ("timeout_floor", 30.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, settings.get(name, default))
    if args.modules:
        modules = [m for m in modules if m.path in args.modules]
    if args.packages:
        modules = [m for m in modules if m.package in args.packages]
    if not modules:
        parser.error("no module selected")
    root = ROOT
    with tempfile.TemporaryDirectory(prefix="mutation-src-") as src:
        if args.rev is not None:  # mutants of that commit's modules
            root = Path(src) / "tree"
            copy_tree(root, rev=args.rev)
        runs = [ModuleRun(m, mutants_of(m.path, root)) for m in modules]
    if args.rerun:
        runs = _survivors_of(Path(args.rerun), runs)
        if Path(args.out).resolve() == Path(args.rerun).resolve().parent:
            args.out = f"{args.out}-rerun"  # keep the report being rerun
        if args.budget_minutes == settings.get("budget_minutes", 30.0):
            args.budget_minutes = 24 * 60.0  # all of them, unless a budget was given
    if args.list:
        for r in runs:
            print(f"# {r.module.path}: {len(r.mutants)} mutants -> {' '.join(r.module.tests)}")
            for m in r.mutants:
                print(f"{m.id}  `{m.source_line}` -> `{m.replacement}`")
        print(f"# {sum(len(r.mutants) for r in runs)} mutants in {len(runs)} modules")
        return 0
    results = run_mutants(args, runs)
    return report(args, runs, results)


if __name__ == "__main__":
    sys.exit(run_main(main, prog="tools.mutation"))
