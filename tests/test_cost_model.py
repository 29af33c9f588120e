"""The static cost model (benchmarks/cost_model.py) on today's heads kernels, and issue 14's targets.

Runs the model in a subprocess (compiling for sm_90a needs the Triton interpreter off): every launch of one
HeadPool forward + backward at SDXL shapes, batch 5, hidden 256, 10 / 40 / 160 heads, compiled and its SASS read.
Target (issue 14): predicted >= 50% of bf16 peak at 40 and 160 heads, and >= 2.5x faster than the batched-eager
+ CUDA-graph baseline (H100 measurement where there is one). The model's own pieces are checked on small inputs.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import cost_model  # noqa: E402

TARGET_FRACTION, TARGET_SPEEDUP = 0.5, 2.5
_PREDICTIONS: dict = {}


def _predictions() -> dict:
    if not _PREDICTIONS:
        pytest.importorskip("triton.backends.nvidia.compiler")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "cost_model.py"), "--json"],
                              capture_output=True, text=True, env=env, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-4000:]
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                _PREDICTIONS[d["heads"]] = d
    return _PREDICTIONS


# Predicted history. The kernels at issue 14's start: 10 heads 15.1 ms (8.3% of peak), 40 heads 56.4 ms (8.9%),
# 160 heads 223 ms (9.1%): 0.46-0.59x the batched-eager+graph baseline's H100 time (this test was an xfail).
# After the GEMM-layout rewrite (e40cc72): 40 heads 8.9 ms (57%, 3.5x), 160 heads 33 ms (61%, 3.1x); with the
# compacted grids: 6.9 ms (74%, 4.5x) and 25 ms (80%, 4.1x). Predictions (~2x), not measurements.


@pytest.mark.slow
def test_every_heads_launch_has_a_prediction():
    preds = _predictions()
    assert sorted(preds) == list(cost_model.HEADS_CASES)
    for heads, pred in preds.items():
        assert not pred["no_work_model"], f"{heads} heads: kernels without a work model: {pred['no_work_model']}"
        mma = [l for l in pred["launches"] if l["flops"]]
        assert mma, "no tensor-core launch found"
        assert all(l["us"] > 0 for l in pred["launches"])
        # the work model accounts for every useful FLOP of the convs (final 4x4 conv aside: it has no MMA loop)
        flops = cost_model.conv_flops(cost_model.sdxl_levels(), heads // 10)
        final = 3 * 2.0 * cost_model.BATCH * cost_model.HIDDEN * 16 * heads
        assert sum(l["flops"] for l in mma) == pytest.approx(flops["total"] - final, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("heads", [40, 160])
def test_heads_meet_issue_14_targets(heads):
    pred = _predictions()[heads]
    baseline = cost_model.baseline_ms(heads)
    assert pred["fraction_of_peak"] >= TARGET_FRACTION, \
        f"{heads} heads: predicted {100 * pred['fraction_of_peak']:.1f}% of bf16 peak ({pred['total_ms']:.2f} ms)"
    assert baseline / pred["total_ms"] >= TARGET_SPEEDUP, \
        f"{heads} heads: predicted {pred['total_ms']:.2f} ms vs baseline {baseline:.1f} ms"


# ----------------------------------------------------------------------------- the model's pieces, no compile
def _loop(**kw):
    loop = dict(cycles={"mma": 512.0, "issue": 200.0, "mufu": 0.0, "integer": 100.0, "fp32": 0.0},
                global_loads={"LDGSTS.E.BYPASS.128": 8}, shared_stores={}, min_depbar=1, scalar_global_loads=0)
    loop.update(kw)
    return loop


def test_loop_cycles_pipelined_vs_serialised():
    good = cost_model.loop_cycles(_loop(), warps=8)
    assert good["chain"] == good["mma"] == pytest.approx(512 / cost_model.MMA_EFFICIENCY)
    assert good["lsu"] == 8 * 8 * 4
    waits = cost_model.loop_cycles(_loop(min_depbar=0), warps=8)
    assert waits["chain"] == pytest.approx(good["mma"] + 200)
    scalar = cost_model.loop_cycles(_loop(min_depbar=0, global_loads={"LDG.E.U16": 16}, scalar_global_loads=16,
                                          shared_stores={"STS.U16": 16}), warps=8)
    assert scalar["lsu"] == 8 * (16 * 32 + 16) and scalar["chain"] == waits["chain"] + cost_model.GLOBAL_LATENCY_CYCLES


def test_occupancy_and_baseline_calibration():
    assert cost_model.occupancy(255, 98304, 8) == 1          # 255 regs x 256 threads: one CTA per SM
    assert cost_model.occupancy(128, 32768, 8) == 2
    assert cost_model.occupancy(32, 1024, 4) == 16
    b = cost_model.baseline(cost_model.CALIBRATION_HEADS)
    assert b["predicted_ms"] == pytest.approx(b["h100_measured_ms"], rel=1e-3)
    for heads in (10, 160):   # the calibrated model vs the other two H100 measurements: within 30%
        b = cost_model.baseline(heads)
        assert 0.7 < b["predicted_ms"] / b["h100_measured_ms"] < 1.3, b


def test_cli_bench_predict(tmp_path):
    from nitrokernels import cli

    args = cli.build_parser(["bench", "--predict"]).parse_args(["bench", "--predict", "--path", str(tmp_path)])
    assert args.predict and cli._run_predict(args) == 2          # no cost_model.py in that folder


def test_measured_times_are_found_in_results_json_and_jsonl(tmp_path):
    assert cost_model.measured_fused_ms(str(tmp_path)) == {}
    case = {"name": "heads_fwd_bwd[40]", "params": {"heads": 40}, "ms": {"fused": 7.5, "batched+graph": 25.0}}
    (tmp_path / "h200-2026-12-01.json").write_text(json.dumps({"environment": {}, "cases": [case]}))
    assert cost_model.measured_fused_ms(str(tmp_path))["ms"] == {40: case["ms"]}
    (tmp_path / "run.jsonl").write_text(json.dumps({"type": "environment"}) + "\n"
                                        + json.dumps({"type": "case", **case, "ms": {"fused": 7.0}}) + "\n")
    os.utime(tmp_path / "run.jsonl", (2e9, 2e9))                 # the newest file wins
    assert cost_model.measured_fused_ms(str(tmp_path))["ms"] == {40: {"fused": 7.0}}
