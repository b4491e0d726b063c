"""``python -m backbones --list [NAME ...]``: print each model's size.

Columns: parameters (millions), GMACs of one 112x112 forward pass (the figure
papers quote as "GFLOPs"), the same as real GFLOPs (2 x MACs), and the
published parameter/GFLOPs figures where there are any.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m backbones",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--list", action="store_true", help="print sizes of the models")
    parser.add_argument("names", nargs="*", help="models to list (default: all)")
    parser.add_argument("--embedding-size", type=int, default=512, help="D of the models")
    args = parser.parse_args(argv)
    from backbones.flops import PUBLISHED, count_macs, count_parameters
    from backbones.registry import get_model, list_models

    if not args.list:
        parser.print_help()
        return 0
    names = args.names or list_models()
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(list_models())}")
    header = (
        f"{'model':<10} {'params(M)':>10} {'GMACs':>8} {'GFLOPs(2xMAC)':>14}"
        f" {'pub.params(M)':>14} {'pub.GFLOPs':>13}"
    )
    print(header)
    for name in names:
        model = get_model(name, embedding_size=args.embedding_size)
        params = count_parameters(model) / 1e6
        gmacs = count_macs(model) / 1e9
        pub_params, pub_gflops = PUBLISHED.get(name, (None, None))
        print(
            f"{name:<10} {params:>10.2f} {gmacs:>8.3f} {2 * gmacs:>14.3f}"
            f" {_fmt(pub_params, 2):>14} {_fmt(pub_gflops, 2):>13}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    from common.cli import run_main

    sys.exit(run_main(main, prog="backbones"))
