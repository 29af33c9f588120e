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


def _case(name, fused=0.5):
    return {"name": name, "params": {"n": 1}, "ms": {"fused": fused, "eager": 2 * fused}, "speedup": {"eager": 2.0},
            "floor_ms": None, "fraction_of_floor": None, "peak_mb": {}, "notes": ""}


def test_report_on_a_partial_jsonl(tmp_path, capsys):
    """A run cut off mid-line: the complete lines are reported, the half line is skipped and counted."""
    report = _report_module()
    path = tmp_path / "cases.jsonl"
    report.append_jsonl(str(path), {"type": "run", "environment": {"gpu": "NVIDIA H200", "commit": "abc"}})
    report.append_jsonl(str(path), {"type": "environment", "gpu": "NVIDIA H200", "torch": "2.11", "cuda": "13.0",
                                    "triton": "3.6", "roofline": {"copy_GBps": 4300.0, "matmul_TFLOPs": {"bfloat16": 790.0}}})
    report.append_jsonl(str(path), {"type": "case", **_case("op.a")})
    report.append_jsonl(str(path), {"type": "step", "name": "heads", "status": "timeout", "seconds": 12, "cases": 1})
    report.append_jsonl(str(path), {"type": "step", "name": "pipeline", "status": "skipped", "seconds": 0,
                                    "note": "needs ~180 s, 20 s left"})
    with open(path, "a") as f:
        f.write(json.dumps({"type": "case", **_case("op.b")})[:40])  # the writer was killed here
    data = report.load_jsonl(str(path))
    assert [c["name"] for c in data["cases"]] == ["op.a"] and data["bad_lines"] == 1
    assert data["environment"]["gpu"] == "NVIDIA H200" and data["environment"]["commit"] == "abc"
    table = report.markdown_table(data)
    assert "| op.a | n=1 | 0.500 | eager 1.000 | eager 2.00× | – | – |" in table
    assert "| heads | timeout | 12 | 1 |" in table
    assert "skipped (did not fit the budget or could not run): pipeline" in table
    assert "1 unreadable line(s) skipped" in table
    assert report.main([str(path), "--out", str(tmp_path / "o")]) == 0
    assert "| op.a |" in capsys.readouterr().out
    assert (tmp_path / "o" / "cases.md").exists() and (tmp_path / "o" / "cases.png").exists()
    # appending after the half line starts a new line: the next record is not lost with it
    report.append_jsonl(str(path), {"type": "case", **_case("op.c")})
    assert [c["name"] for c in report.load_jsonl(str(path))["cases"]] == ["op.a", "op.c"]


def test_report_on_an_empty_or_garbage_jsonl(tmp_path):
    report = _report_module()
    path = tmp_path / "cases.jsonl"
    path.write_bytes(b'{"type": "case", "name": "x"}\n\xff\xfe not json\n[1, 2]\n')
    data = report.load_jsonl(str(path))
    assert data["cases"] == [] and data["bad_lines"] == 3
    assert "(no case measured)" in report.markdown_table(data)


def test_results_json_merges_cases(tmp_path):
    """write_results keeps the cases of earlier suites (one process per suite) and replaces a re-measured case."""
    report = _report_module()
    env = {"gpu": "NVIDIA H200", "date": "2026-12-01T21:00:00"}
    report.write_results(str(tmp_path), env, [_case("a"), _case("b")])
    path = report.write_results(str(tmp_path), env, [_case("b", fused=0.25), _case("c")])
    assert os.path.basename(path) == "nvidia-h200-2026-12-01.json"
    cases = json.load(open(path))["cases"]
    assert [(c["name"], c["ms"]["fused"]) for c in cases] == [("a", 0.5), ("b", 0.25), ("c", 0.5)]
