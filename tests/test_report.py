"""benchmarks/report.py renders whatever a benchmark run wrote: a markdown table and a PNG chart."""
import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(REPO, "benchmarks", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_renders_table_and_chart(tmp_path):
    results = {
        "environment": {"gpu": "Test GPU", "torch": "x", "cuda": "y", "triton": "z", "commit": "abc", "date": "d",
                        "roofline": {"copy_GBps": 3000.0, "matmul_TFLOPs": {"bfloat16": 700.0}}},
        "cases": [{"name": "op.fwd", "params": {"shape": "(1, 2)"}, "ms": {"fused": 0.5, "eager": 2.0},
                   "speedup": {"eager": 4.0}, "floor_ms": 0.25, "fraction_of_floor": 0.5, "peak_mb": {}, "notes": ""}],
    }
    path = tmp_path / "test-gpu.json"
    path.write_text(json.dumps(results))
    assert _report_module().main([str(path)]) == 0
    table = (tmp_path / "test-gpu.md").read_text()
    assert "| op.fwd | shape=(1, 2) | 0.500 | eager 2.000 | eager 4.00× | 0.250 | 50% |" in table
    assert (tmp_path / "test-gpu.png").stat().st_size > 1000
