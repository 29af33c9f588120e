"""Render benchmark results: a markdown table and a PNG speedup chart.

    python benchmarks/report.py [results/<gpu>-<date>.json ...] [--out DIR]

Without arguments it uses the newest file in benchmarks/results/. Writes <name>.md and <name>.png next to the
output folder (default: the results folder) and prints the table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def markdown_table(data: dict) -> str:
    env = data["environment"]
    roof = env.get("roofline", {})
    lines = [
        f"**{env['gpu']}** — torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
        f"commit {str(env.get('commit'))[:10]}, {env['date']}",
        f"measured roofline: copy {roof.get('copy_GBps', 0):.0f} GB/s, matmul "
        + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in roof.get("matmul_TFLOPs", {}).items()),
        "",
        "| case | params | fused ms | baselines ms | speedup (baseline / fused) | floor ms | % of floor |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for case in data["cases"]:
        baselines = ", ".join(f"{k} {v:.3f}" for k, v in case["ms"].items() if k != "fused")
        speedup = ", ".join(f"{k} {v:.2f}×" for k, v in case["speedup"].items())
        floor = f"{case['floor_ms']:.3f}" if case.get("floor_ms") else "–"
        frac = f"{100 * case['fraction_of_floor']:.0f}%" if case.get("fraction_of_floor") else "–"
        lines.append(f"| {case['name']} | {_params(case['params'])} | {case['ms']['fused']:.3f} | {baselines} | "
                     f"{speedup} | {floor} | {frac} |")
    return "\n".join(lines)


def speedup_chart(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    baselines = sorted({k for c in cases for k in c["speedup"]})
    labels = [f"{c['name']}\n{_params(c['params'])}" for c in cases]
    height = 0.8 / max(len(baselines), 1)
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(cases) * max(len(baselines), 1) ** 0.5))
    for i, base in enumerate(baselines):
        values = [c["speedup"].get(base, 0.0) for c in cases]
        ax.barh([j + i * height for j in range(len(cases))], values, height=height, label=f"vs {base}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + height * (len(baselines) - 1) / 2 for j in range(len(cases))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of the fused path (×, higher is better)")
    ax.set_title(f"nitrokernels on {data['environment']['gpu']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="results JSON files (default: the newest in benchmarks/results)")
    parser.add_argument("--out", default=None, help="folder for the .md and .png (default: beside each JSON)")
    args = parser.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")), key=os.path.getmtime)[-1:]
    if not files:
        print(f"no results in {RESULTS_DIR}: run `nitrokernels bench` (or pytest benchmarks/ --benchmark-only) on a GPU")
        return 1
    for path in files:
        with open(path) as f:
            data = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        out_dir = args.out or os.path.dirname(os.path.abspath(path))
        os.makedirs(out_dir, exist_ok=True)
        table = markdown_table(data)
        with open(os.path.join(out_dir, stem + ".md"), "w") as f:
            f.write(table + "\n")
        speedup_chart(data, os.path.join(out_dir, stem + ".png"))
        print(table)
        print(f"\nwrote {os.path.join(out_dir, stem + '.md')} and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
