"""`make bench-scale`: the reference-scale measurements (GPT-2 small: 12 × 3,072 neurons, 10,000 × 1,024 tokens, 100
examples per neuron; and a 7B-sized index), each printed beside its target. Every part is measured on this machine,
on synthetic inputs shaped like the reference workload; where the full size would take too long a part measures
slices and shows its extrapolation next to the measured points. Everything also goes to bench-out/scale/results.json.

Parts (docs/scaling.md says what each measures and how it grows): collector (builder/scale/collector.py), importance
(importance.py), site (site.py), index (index.py). `--quick` runs each part's small variant (under a minute each);
`--part NAME` runs one.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from pathlib import Path

import click
import torch

PARTS = ("collector", "importance", "site", "index")


def human(value, unit: str) -> str:
    if unit == "B" and isinstance(value, (int, float)):
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return f"{value} {unit}".strip()


def figures(result: dict, prefix: str = ""):
    """Every {"name", "value", ...} entry of a part's result, depth first."""
    for key, entry in result.items():
        if isinstance(entry, dict) and "name" in entry and "value" in entry:
            yield entry
        elif isinstance(entry, dict):
            yield from figures(entry, f"{prefix}{key}.")


def show(part: str, result: dict, seconds: float) -> None:
    click.echo(f"\n{part} ({seconds:.0f} s)")
    for entry in figures(result):
        value = human(entry["value"], entry.get("unit", ""))
        target = ""
        if "target" in entry:
            mark = "met" if entry.get("met") else "NOT MET"
            target = f"   target {human(entry['target'], entry.get('unit', ''))}: {mark}"
        click.echo(f"  {entry['name']:<72} {value}{target}")


@click.command()
@click.option("--quick", is_flag=True, help="Each part's small variant (a smoke run, not the measurement).")
@click.option("--part", "parts", multiple=True, type=click.Choice(PARTS), help="Run only these parts.")
@click.option("--out", default="bench-out/scale", show_default=True, help="Scratch folder and results.json.")
def main(quick: bool, parts: tuple[str, ...], out: str) -> None:
    from builder.cli import quiet_libraries

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    quiet_libraries()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    click.echo(f"Neuron Atlas bench-scale{' (quick)' if quick else ''}: {os.cpu_count()} cores, torch "
               f"{torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    results = {}
    started_all = time.perf_counter()
    for part in parts or PARTS:
        started = time.perf_counter()
        result = importlib.import_module(f"builder.scale.{part}").measure(root / part, quick)
        seconds = time.perf_counter() - started
        results[part] = {"seconds": round(seconds, 1), **result}
        show(part, result, seconds)
        (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    click.echo(f"\nall parts: {time.perf_counter() - started_all:.0f} s; figures and measured points in "
               f"{root / 'results.json'}")


if __name__ == "__main__":
    main()
