"""The GPU check's report: ``gpu_check.json`` (every figure, the plan, the versions)
and ``gpu_check.md`` (the same as Markdown tables: goals, environment, one per section)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import markdown_table
from common.atomic import write_text


def _cell(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; a dash where nothing was measured (None)."""
    return "—" if value is None else format(value, spec)


def _text_cell(text: str | None) -> str:
    """Free text (an error) made safe for one table cell."""
    return (text or "").replace("|", "/").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: goals, environment, one table per section."""
    env = report["environment"]
    lines = [
        "# GPU check" + (" (smoke run: CPU, tiny sizes)" if report["smoke"] else ""),
        "",
        f"{report['started']}, {report['total_s']:.0f} s, "
        + (
            "still running"
            if report["exit_status"] is None
            else f"exit status {report['exit_status']}"
        )
        + ". "
        f"torch {env['torch']}, CUDA {env.get('cuda_runtime') or '—'}, "
        f"cuDNN {env.get('cudnn') or '—'}, GPU {env.get('gpu', 'none')} "
        f"(capability {env.get('gpu_capability', '—')}, {env.get('gpu_memory_gib', '—')} GiB, "
        f"driver {env.get('driver') or '—'}), Python {env['python']}, {env['cpus']} CPUs, "
        f"commit {env.get('git_commit') or '—'}.",
        "",
        "## Goals",
        "",
    ]
    lines += markdown_table(
        ("goal", "target", "measured", "status"),
        ((g["goal"], g["target"], g["measured"], g["status"]) for g in report["goals"]),
    )
    lines += ["", "## Sections", ""]
    lines += markdown_table(
        ("section", "status", "seconds", "error"),
        (
            (name, sec["status"], f"{sec['seconds']:.1f}", _text_cell(sec.get("error")))
            for name, sec in report["sections"].items()
        ),
    )
    sections = report["sections"]
    lines += _head_markdown(sections.get("head", {}))
    lines += _triton_markdown(sections.get("triton", {}))
    lines += _train_markdown(sections.get("train", {}))
    lines += _loader_markdown(sections.get("loader", {}))
    lines += _tests_markdown(sections.get("tests", {}))
    return "\n".join(lines) + "\n"


def _head_markdown(head: dict[str, Any]) -> list[str]:
    """The head section's table, and why its triton rows are missing if they are."""
    lines: list[str] = []
    if head.get("rows"):
        lines += [
            "",
            f"## Head (B {head['batch']}, D {head['dim']}, {head['margin']}, one process, "
            f"medians of {head['repeats']} interleaved calls)",
            "",
        ]
        header = (
            "C_local", "products", "sample_rate", "backend", "head ms", "3 bare ms",
            "head / bare", "dense ms", "dense / bare", "head mem MiB", "/ weight grad",
            "beyond the grad MiB", "dense mem MiB",
        )  # fmt: skip
        lines += markdown_table(
            header,
            (
                (
                    f"{r['c_local']:,}",
                    r["matmul"],
                    r["sample_rate"],
                    r.get("backend", "torch"),
                    f"{r['head_s'] * 1e3:.2f}",
                    f"{r['bare_s'] * 1e3:.2f}",
                    f"{r['head_over_bare']:.2f}x",
                    f"{r['dense_s'] * 1e3:.2f}",
                    f"{r['dense_over_bare']:.2f}x",
                    _cell(r["head_mem_mib"], ".0f"),
                    _cell(r["head_mem_over_grad"], ".2f"),
                    _cell(r.get("head_extra_mib"), ".0f"),
                    _cell(r["dense_mem_mib"], ".0f"),
                )
                for r in head["rows"]
            ),
        )
    if head.get("triton_rows"):
        lines += ["", f"Triton backend rows: {head['triton_rows']}."]
    return lines


def _triton_markdown(triton: dict[str, Any]) -> list[str]:
    """The triton section's tables (candidates per kernel, the two layouts)."""
    if triton.get("not_run"):
        return ["", "## Triton autotune", "", f"Not run: {triton['not_run']}."]
    if not (triton.get("forward") or triton.get("weight_grad")):
        return []
    lines = [
        "",
        f"## Triton autotune (C_local {triton['c_local']:,}, B {triton['batch']}, "
        f"D {triton['dim']}, {triton['matmul']} products, medians of {triton['repeats']})",
    ]
    keys = {
        "forward": ("block_b", "block_c", "num_warps", "num_stages"),
        "weight_grad": ("grad_block_c", "grad_block_b", "grad_num_warps", "grad_num_stages"),
    }
    for kernel, names in keys.items():
        if not triton.get(kernel):
            continue
        lines.append("")
        lines += markdown_table(
            (f"{kernel} kernel: {', '.join(names)}", "ms", "error"),
            (
                (
                    ", ".join(str(r["tiles"][n]) for n in names),
                    _cell(r["ms"], ".3f"),
                    _text_cell(r["error"]),
                )
                for r in triton[kernel]
            ),
        )
    if triton.get("layouts"):
        lines.append("")
        lines += markdown_table(
            ("embedding gradient", "step ms", "3 bare ms", "step / bare", "beyond the grad MiB"),
            (
                (
                    "from the forward (4 products)"
                    if r["dx_in_forward"]
                    else "recomputed in the backward (5 products)",
                    f"{r['step_ms']:.3f}",
                    f"{r['bare_ms']:.3f}",
                    f"{r['over_bare']:.2f}x",
                    _cell(r["extra_mib"], ".0f"),
                )
                for r in triton["layouts"]
            ),
        )
    if triton.get("recommended_tiles"):
        lines += ["", f"Recommended tiles: `{triton['recommended_tiles']}`."]
    return lines


def _train_markdown(train: dict[str, Any]) -> list[str]:
    """The train section's table."""
    if not train.get("rows"):
        return []
    lines = [
        "",
        f"## Training steps (Trainer.train_step, synthetic batches on the device, "
        f"cudnn.benchmark {train.get('cudnn_benchmark')})",
        "",
    ]
    header = (
        "network", "channels_last", "batch", "classes", "autocast", "head products", "img/s",
        "median step ms", "peak memory GiB", "skipped steps",
    )  # fmt: skip
    lines += markdown_table(
        header,
        (
            (
                r["network"],
                r["channels_last"],
                r["batch"],
                f"{r['classes']:,}",
                r["amp"],
                r["head_matmul"],
                f"{r['img_s']:,.0f}",
                f"{r['median_step_s'] * 1e3:.1f}",
                _cell(r["peak_mem_gib"], ".2f"),
                r["skipped_steps"],
            )
            for r in train["rows"]
        ),
    )
    return lines


def _loader_markdown(loader: dict[str, Any]) -> list[str]:
    """The loader section's table, with the synthetic dataset it read."""
    if not loader.get("rows"):
        return []
    data = loader["dataset"]
    lines = [
        "",
        f"## Loader (synthetic .rec: {data['images']:,} images, "
        f"{data['jpeg_bytes_mean']:,.0f} B per record, generated in "
        f"{data['generated_in_s']:.1f} s)",
        "",
    ]
    lines += markdown_table(
        ("workers", "batch", "timed batches", "delivered to", "img/s"),
        (
            (r["workers"], r["batch"], r["timed_batches"], r["device"], f"{r['img_s']:,.0f}")
            for r in loader["rows"]
        ),
    )
    return lines


def _tests_markdown(tests: dict[str, Any]) -> list[str]:
    """The tests section's runs, or why they did not run."""
    if not (tests.get("runs") or tests.get("not_run")):
        return []
    lines = ["", "## Tests", ""]
    if tests.get("not_run"):
        return [*lines, f"Not run: {tests['not_run']}."]
    lines += markdown_table(
        ("run", "status", "summary", "seconds", "log"),
        (
            (f"`{r['command']}`", r["status"], r["summary"], f"{r['seconds']:.0f}", r["log"])
            for r in tests["runs"]
        ),
    )
    return lines


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write ``gpu_check.json`` and ``gpu_check.md`` to ``out_dir``, each atomically
    (a reader never sees half a report, as the report is rewritten after every section)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    write_text(out_dir / "gpu_check.md", markdown(report))
