"""Summarise a finished run: verification before/after and where the outputs are.

``python -m trainer.report OUTPUT_DIR [--min-accuracy 0.95]`` prints the first and last
verification results recorded in ``OUTPUT_DIR/verification.json`` and lists the files
the run wrote; exits 1 if the last accuracy of any target is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from common.errors import UserError


class ReportError(UserError):
    """``verification.json`` is not what a run writes; the message names it."""


def summarize(output: Path, min_accuracy: float | None) -> int:
    """Print the summary; return the exit code (a missing file raises ``OSError``, a
    malformed one :class:`ReportError`, both naming it)."""
    path = output / "verification.json"
    try:
        history = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not a verification history ({exc})") from None
    if not isinstance(history, list) or not all(
        isinstance(h, dict) and isinstance(h.get("results"), dict) and "step" in h for h in history
    ):
        raise ReportError(f"{path}: not a verification history (a list of step results)")
    if not history:
        print(f"{output}: no verification results", file=sys.stderr)
        return 1
    first, last = history[0], history[-1]
    status = 0
    print(f"verification ({output / 'verification.json'}):")
    for name, result in last["results"].items():
        before = first["results"].get(name, {}).get("accuracy", float("nan"))
        after = result["accuracy"]
        print(
            f"  {name}: accuracy {before:.4f} at step {first['step']} -> "
            f"{after:.4f} +- {result.get('accuracy_std', 0.0):.4f} at step {last['step']}"
        )
        if min_accuracy is not None and after < min_accuracy:
            print(f"  {name}: below the expected {min_accuracy:.2f}", file=sys.stderr)
            status = 1
    print("outputs:")
    for item in sorted(output.iterdir()):
        if item.name.startswith("."):
            continue
        suffix = "/" if item.is_dir() else ""
        print(f"  {item}{suffix}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.report",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("output", type=Path, help="the run's train.output directory")
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="fail (exit 1) when a target's last accuracy is below it",
    )
    args = parser.parse_args(argv)
    return summarize(args.output, args.min_accuracy)


if __name__ == "__main__":
    from common.cli import run_main

    sys.exit(run_main(main, prog="trainer.report"))
