"""Render benchmark results: a markdown table and a PNG speedup chart.

    python benchmarks/report.py [results/<gpu>-<date>.json | OUT/cases.jsonl ...] [--out DIR]

Without arguments it uses the newest file in benchmarks/results/. Takes the results JSON a session wrote or the
JSON-lines file benchmarks/gpu_driver.py appends to case by case -- also a partial one (a run cut off mid-line:
unreadable lines are skipped and counted). Writes <name>.md and <name>.png into the output folder (default:
beside each input) and prints the table. Without matplotlib the PNG is left out (and said so); the table is
still written.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line to `path` and make it durable at once (flush + fsync).

    If the file ends in a half-written line (a writer killed mid-line), a newline is put first, so only that
    line is lost, never this one."""
    line = json.dumps(record, default=str) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab") as f:
        if f.tell() > 0:
            with open(path, "rb") as g:
                g.seek(-1, os.SEEK_END)
                if g.read(1) != b"\n":
                    line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def results_name(env: dict) -> str:
    """<gpu>-<date>.json, the results file name of the benchmarks/results/ convention."""
    gpu = "".join(c if c.isalnum() else "-" for c in str(env.get("gpu") or "unknown")).strip("-").lower()
    date = str(env.get("date") or datetime.date.today().isoformat())[:10]
    return f"{gpu}-{date}.json"


def _case_key(case: dict) -> str:
    return json.dumps([case.get("name"), case.get("params")], sort_keys=True, default=str)


def write_results(directory: str, env: dict, cases: list[dict], extra: dict | None = None) -> str:
    """Write {"environment", "cases", **extra} to <directory>/<gpu>-<date>.json, merging with a file there
    (a case with the same name and params is replaced by the newer one)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, results_name(env))
    merged: dict[str, dict] = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                merged = {_case_key(c): c for c in json.load(f).get("cases", [])}
        except (OSError, ValueError, AttributeError):
            merged = {}
    for case in cases:
        merged.pop(_case_key(case), None)
        merged[_case_key(case)] = case
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": env, "cases": list(merged.values()), **(extra or {})}, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def load_jsonl(path: str) -> dict:
    """{"environment", "cases", "steps", "run", "bad_lines"} from a (possibly truncated) JSONL file."""
    env, harness_env, cases, steps, run, bad = {}, {}, [], [], {}, 0
    with open(path, "rb") as f:
        raw = f.read()
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(record, dict):
            bad += 1
            continue
        kind = record.pop("type", "case")
        if kind == "case":
            if "name" in record and isinstance(record.get("ms"), dict) and "fused" in record["ms"]:
                cases.append(record)
            else:
                bad += 1
        elif kind == "environment":
            if record.get("roofline") or not harness_env:
                harness_env = record
        elif kind == "run":
            run = record
            env.update(record.get("environment", {}))
        elif kind in ("step", "end"):
            steps.append(dict(record, type=kind))
    env.update({k: v for k, v in harness_env.items() if v is not None})
    return {"environment": env, "cases": cases, "steps": steps, "run": run, "bad_lines": bad}


def load(path: str) -> dict:
    if path.endswith(".jsonl"):
        return load_jsonl(path)
    with open(path) as f:
        return json.load(f)


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in (params or {}).items())


def _num(value, fmt: str) -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(data: dict) -> str:
    env = data.get("environment", {})
    roof = env.get("roofline") or {}
    lines = [
        f"**{env.get('gpu', 'unknown GPU')}** — torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"triton {env.get('triton')}, commit {str(env.get('commit'))[:10]}, {env.get('date')}",
        f"measured roofline: copy {roof.get('copy_GBps', 0):.0f} GB/s, matmul "
        + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in roof.get("matmul_TFLOPs", {}).items()),
        "",
        "| case | params | fused ms | baselines ms | speedup (baseline / fused) | floor ms | % of floor |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for case in data.get("cases", []):
        baselines = ", ".join(f"{k} {_num(v, '.3f')}" for k, v in case["ms"].items() if k != "fused")
        speedup = ", ".join(f"{k} {_num(v, '.2f')}×" for k, v in (case.get("speedup") or {}).items())
        floor = _num(case["floor_ms"], ".3f") if case.get("floor_ms") else "–"
        frac = f"{100 * case['fraction_of_floor']:.0f}%" if case.get("fraction_of_floor") else "–"
        lines.append(f"| {case['name']} | {_params(case.get('params'))} | {_num(case['ms']['fused'], '.3f')} | "
                     f"{baselines} | {speedup} | {floor} | {frac} |")
    if not data.get("cases"):
        lines.append("| (no case measured) | | | | | | |")
    steps = [s for s in data.get("steps", []) if s.get("type", "step") == "step"]
    if steps:
        lines += ["", "| step | status | seconds | cases | note |", "|---|---|---:|---:|---|"]
        for s in steps:
            lines.append(f"| {s.get('name')} | {s.get('status')} | {_num(s.get('seconds', 0), '.0f')} | "
                         f"{s.get('cases', '')} | {str(s.get('note', '')).replace('|', '/')} |")
    skipped = [s["name"] for s in steps if s.get("status") == "skipped"]
    if skipped:
        lines.append(f"\nskipped (did not fit the budget or could not run): {', '.join(skipped)}")
    if data.get("bad_lines"):
        lines.append(f"\n{data['bad_lines']} unreadable line(s) skipped (a run cut off mid-write)")
    return "\n".join(lines)


def speedup_chart(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    baselines = sorted({k for c in cases for k in (c.get("speedup") or {})})
    labels = [f"{c['name']}\n{_params(c.get('params'))}" for c in cases]
    height = 0.8 / max(len(baselines), 1)
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * max(len(cases), 1) * max(len(baselines), 1) ** 0.5))
    for i, base in enumerate(baselines):
        values = [(c.get("speedup") or {}).get(base, 0.0) for c in cases]
        ax.barh([j + i * height for j in range(len(cases))], values, height=height, label=f"vs {base}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + height * (len(baselines) - 1) / 2 for j in range(len(cases))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of the fused path (×, higher is better)")
    ax.set_title(f"nitrokernels on {data.get('environment', {}).get('gpu')}")
    if baselines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(data: dict, out_dir: str, stem: str, chart: bool = True) -> tuple[str, str]:
    """Write <stem>.md (and <stem>.png when matplotlib is there); returns (table, what was written)."""
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(data)
    md = os.path.join(out_dir, stem + ".md")
    with open(md, "w") as f:
        f.write(table + "\n")
    written = f"wrote {md}"
    if chart and data.get("cases"):
        try:
            speedup_chart(data, os.path.join(out_dir, stem + ".png"))
            written += f" and {stem}.png"
        except ImportError as err:
            written += f" (no PNG: {err})"
    return table, written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="results JSON / JSONL files (default: the newest in benchmarks/results)")
    parser.add_argument("--out", default=None, help="folder for the .md and .png (default: beside each input)")
    parser.add_argument("--no-chart", action="store_true", help="write the table only")
    args = parser.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")), key=os.path.getmtime)[-1:]
    if not files:
        print(f"no results in {RESULTS_DIR}: run `nitrokernels bench` (or pytest benchmarks/ --benchmark-only) on a GPU")
        return 1
    for path in files:
        data = load(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        table, written = render(data, args.out or os.path.dirname(os.path.abspath(path)), stem, not args.no_chart)
        print(table)
        print(f"\n{written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
