"""Plain text about a run: what it is (``loft-probe inspect``), and findings as text or JSON."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict

from loft_probe.diagnosis.finding import Finding, number
from loft_probe.diagnosis.reading import run_series
from loft_probe.run import RUN_LAYER, Run

MAX_LAYERS_SHOWN = 24  # describe_run lists this many layers, then "... and N more": it should fit one screen


def describe_run(run: Run, width: int = 100) -> str:
    """One screen of plain text about a run: what was run, which layers, what was recorded, whether it closed.

    The text of ``loft-probe inspect``; every line is read from meta.json and the metrics, nothing measured.
    """
    meta, metrics = run.meta, run.metrics
    task = meta.get("task") if isinstance(meta.get("task"), dict) else {}
    hyper = dict(meta.get("hyperparameters") or {})
    for key in ("rank", "alpha"):
        if meta.get(key) is not None:
            hyper[key] = meta[key]
    lines = [f"{run.name}  ({run.path})"]
    lines += _wrap(f"method {run.method}, optimizer {meta.get('optimizer', '?')}"
                           + (f", task {task['name']} {task.get('options') or ''}".rstrip() if task.get("name") else "")
                           + f", seed {meta.get('seed')}, data order {meta.get('data_order')}",
                           width, initial_indent="  ", subsequent_indent="    ")
    lines += _wrap("hyperparameters: " + (", ".join(f"{k}={v}" for k, v in hyper.items()) or "none"),
                           width, initial_indent="  ", subsequent_indent="    ")
    lr = run_series(run, "lr")
    if len(lr) and lr.min() != lr.max():
        lines.append(f"  lr recorded from {number(float(lr.iloc[0]))} to {number(float(lr.iloc[-1]))} "
                     f"(range {number(float(lr.min()))}–{number(float(lr.max()))}): a schedule")
    lines.append(f"  probe: record {meta.get('schedule', '?')}, snapshots {meta.get('snapshots', '?')}, "
                 f"shadow {_on(meta.get('shadow'))}, gradient capture {_on(meta.get('capture_grad'))}")
    if meta.get("closed"):
        lines.append(f"  status: closed at step {meta.get('last_step', run.last_step)}")
    else:
        lines.append(f"  status: not closed (running, or stopped without closing); last complete step "
                     f"{run.last_step}")
    layer_rows = metrics[metrics["layer"] != RUN_LAYER]
    steps = sorted(set((layer_rows if len(layer_rows) else metrics)["step"]))
    lines.append(f"  recorded steps: {len(steps)}" + (f" ({steps[0]}–{steps[-1]})" if steps else ""))
    lines.append("  snapshots: " + (", ".join(map(str, run.snapshot_steps)) or "none"))
    layers = meta["layers"]
    lines.append(f"  layers ({len(layers)}):")
    name_width = max((len(str(layer.get("name"))) for layer in layers[:MAX_LAYERS_SHOWN]), default=0)
    for layer in layers[:MAX_LAYERS_SHOWN]:
        shape = "×".join(map(str, layer.get("shape") or []))
        rank = f"  rank {layer['rank']}  scale {number(layer['scale'])}" if layer.get("rank") else ""
        lines.append(f"    {str(layer.get('name')):<{name_width}}  {shape:<11} {layer.get('kind', '?')}{rank}")
    if len(layers) > MAX_LAYERS_SHOWN:
        lines.append(f"    ... and {len(layers) - MAX_LAYERS_SHOWN} more")
    counts = metrics.groupby("metric", sort=True).size()
    items = [f"{metric} {count}" for metric, count in counts.items()] or ["none"]
    lines += _wrap_items("metrics (rows): ", items, width)
    return "\n".join(lines)


def _wrap_items(head: str, items: list[str], width: int) -> list[str]:
    """``head`` and comma-separated items wrapped at ``width``, breaking only between items ("name count" stays
    on one line, so a reader, or a grep, finds a metric with its count)."""
    lines, line = [], "  " + head
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(line) + 1 + len(piece) > width and line.strip() != head.strip():
            lines.append(line)
            line = "    " + piece
        else:
            line += ("" if line.endswith(head) else " ") + piece
    return [*lines, line]


def _on(flag: object) -> str:
    return "on" if flag else "off"


# ---------------------------------------------------------------------------------------------- output
def format_findings(findings: list[Finding], width: int = 100) -> str:
    """Plain text: one block per finding (severity, code, title; evidence; suggestion), wrapped at `width`."""
    if not findings:
        return "No findings: nothing stands out in the recorded metrics."
    blocks = []
    for f in findings:
        evidence = ", ".join(f"{key}={number(value)}" for key, value in f.evidence.items())
        lines = _wrap(f"[{f.severity}] {f.code}: {f.title}", width, subsequent_indent="    ")
        lines += _wrap(f"evidence: {evidence}", width, initial_indent="    ", subsequent_indent="      ")
        lines += _wrap(f"try: {f.suggestion}", width, initial_indent="    ", subsequent_indent="      ")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def findings_to_json(findings: list[Finding]) -> str:
    """A JSON list of findings (the dataclass fields); a non-finite number is written as a string ("inf")."""
    def clean(value: float | str) -> float | str:
        return value if isinstance(value, str) or math.isfinite(value) else str(value)

    items = [{**asdict(f), "evidence": {k: clean(v) for k, v in f.evidence.items()}} for f in findings]
    return json.dumps(items, indent=2, ensure_ascii=False, allow_nan=False)


def _wrap(text: str, width: int, **indents: str) -> list[str]:
    """textwrap.wrap that keeps names whole: "minilm-sentiment" and long layer names are not split."""
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False, **indents)
