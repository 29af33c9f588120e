"""benchmarks/gpu_driver.py (what benchmarks/gpu_run.sh runs on a lent GPU), tested on the CPU with stub suites.

The stubs are tiny scripts / pytest files made in tmp_path that record cases, sleep past their timeout, crash
(os.abort) or fail. What must hold on the GPU machine: the budget is kept (a suite past its timeout is killed,
its process group with it, and the driver goes on), a crash or a failure does not stop the next step, the JSONL
holds every case that finished (also those of a killed suite, up to the kill), at most 8 files come back, the
summary is printed last, and what did not fit the budget is reported as skipped.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "benchmarks", "gpu_driver.py")


def _module(name, filename):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


# A stub case writer: the same append as the harness's (report.append_jsonl), without importing torch.
CASE = """
import os, sys
from report import append_jsonl

def case(name, **notes):
    append_jsonl(os.environ["NITROKERNELS_BENCH_JSONL"],
                 {"type": "case", "suite": os.environ["NITROKERNELS_BENCH_SUITE"], "name": name, "params": {"n": 1},
                  "ms": {"fused": 1.0, "eager": 2.0}, "speedup": {"eager": 2.0}, "floor_ms": None,
                  "fraction_of_floor": None, "peak_mb": {}, "notes": os.environ.get("NITROKERNELS_BENCH_COMPILE", "?")})
    print("case", name, flush=True)
"""

STUBS = {
    # the real harness: Recorder + WallClock (the CPU clock), two cases
    "ok.py": """
        import os
        from harness import Recorder, WallClock
        rec = Recorder(clock=WallClock())
        for i in range(2):
            rec.compare(f"ok.case{i}", {"i": i}, {"fused": lambda: sum(range(100)), "eager": lambda: sum(range(300))},
                        warmup=1, reps=3, notes=os.environ["NITROKERNELS_BENCH_COMPILE"])
    """,
    # one case, then a grandchild and a long sleep: killed by its timeout, the case must survive
    "sleepy.py": CASE + """
        import subprocess, time
        case("sleepy.before_kill")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open(os.environ["STUB_PIDFILE"], "w").write(str(child.pid))
        time.sleep(120)
        case("sleepy.never")
    """,
    # one case, then abort (as a CUDA device-side assert or a segfault would end a process)
    "crash.py": CASE + """
        case("crash.before_abort")
        os.abort()
    """,
    "after.py": CASE + """
        case("after.case")
    """,
}

PYTEST_STUB = CASE + """
def test_records_a_case():
    case("pytest.case")

def test_fails():
    assert False, "a failing benchmark test"
"""


def _write_stubs(tmp_path):
    folder = tmp_path / "stubs"
    folder.mkdir()
    for name, body in STUBS.items():
        if body.startswith(CASE):
            body = CASE + textwrap.dedent(body[len(CASE):])
        (folder / name).write_text(textwrap.dedent(body))
    (folder / "test_stub_bench.py").write_text(PYTEST_STUB)
    return folder


def _suites_json(tmp_path, suites):
    path = tmp_path / "suites.json"
    path.write_text(json.dumps(suites))
    return str(path)


def _drive(tmp_path, *args, env=None, timeout=120):
    out = tmp_path / "out"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, DRIVER, str(out), "--no-build", "--no-info", "--no-tests",
                           "--results-dir", str(tmp_path / "results"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, **(env or {})))
    return proc, out, time.monotonic() - started


def _records(out):
    report = _module("bench_report_t", "report.py")
    return report.load_jsonl(str(out / "cases.jsonl"))


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_driver_keeps_going_and_keeps_every_case(tmp_path):
    stubs = _write_stubs(tmp_path)
    py = sys.executable
    suites = [  # "huge" first: skipped (cannot fit), and then not counted against the compile baselines of "ok"
        {"name": "huge", "cmd": [py, "-c", "print('should not run')"], "estimate_s": 900, "first_case_s": 600},
        {"name": "ok", "cmd": [py, str(stubs / "ok.py")], "estimate_s": 20, "compile_s": 1, "first_case_s": 0.1},
        {"name": "sleepy", "cmd": [py, str(stubs / "sleepy.py")], "estimate_s": 2, "first_case_s": 0.1},
        {"name": "crash", "cmd": [py, str(stubs / "crash.py")], "estimate_s": 5, "first_case_s": 0.1},
        {"name": "pytest_stub", "file": str(stubs / "test_stub_bench.py"), "estimate_s": 20, "first_case_s": 0.1},
        {"name": "after", "cmd": [py, str(stubs / "after.py")], "estimate_s": 5, "compile_s": 10_000,
         "first_case_s": 0.1},
    ]
    proc, out, seconds = _drive(tmp_path, "--suites-json", _suites_json(tmp_path, suites), "--budget", "120",
                                "--reserve", "5", "--slack", "2", env={"STUB_PIDFILE": str(tmp_path / "pid")})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # steps failed: reported in the exit status
    data = _records(out)
    steps = {s["name"]: s for s in data["steps"] if s.get("type") == "step"}
    assert {k: steps[k]["status"] for k in steps} == {
        "ok": "ok", "sleepy": "timeout", "crash": "crashed", "pytest_stub": "failed", "after": "ok",
        "huge": "skipped"}, steps
    # every case that finished, the killed and the crashed suite's included; nothing after the kill
    names = sorted(c["name"] for c in data["cases"])
    assert names == ["after.case", "crash.before_abort", "ok.case0", "ok.case1", "pytest.case", "sleepy.before_kill"]
    assert {s: steps[s]["cases"] for s in ("ok", "sleepy", "crash", "pytest_stub", "after")} == \
        {"ok": 2, "sleepy": 1, "crash": 1, "pytest_stub": 1, "after": 1}
    # the budget: the sleeper was killed at its timeout (2 x 2 s), its grandchild with it
    assert steps["sleepy"]["seconds"] < 15, steps["sleepy"]
    assert seconds < 90
    assert not _alive(int((tmp_path / "pid").read_text()))
    assert "1 failed, 1 passed" in steps["pytest_stub"]["note"]
    # compile baselines: on where the budget allows them, off where it does not
    by_name = {c["name"]: c for c in data["cases"]}
    assert by_name["ok.case0"]["notes"] == "1" and by_name["after.case"]["notes"] == "0"
    assert by_name["ok.case0"]["suite"] == "ok" and by_name["sleepy.before_kill"]["suite"] == "sleepy"
    # output folder: at most 8 files; results JSON built from the JSONL (with the harness's environment)
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    assert "gpu_run.log" in files and "cases.jsonl" in files
    results = [f for f in files if f.endswith(".json")]
    assert len(results) == 1, files
    saved = json.loads((out / results[0]).read_text())
    assert len(saved["cases"]) == 6
    assert {"torch", "triton", "commit", "python"} <= set(saved["environment"])
    assert saved["environment"]["gpu"] == "cpu"  # no nvidia-smi here: the harness said what ran
    assert (tmp_path / "results" / results[0]).exists()
    # the summary table comes last, and names what was skipped
    tail = proc.stdout.rstrip().splitlines()
    table_at = max(i for i, line in enumerate(tail) if line.startswith("| case | params |"))
    assert any("| ok.case0 |" in line for line in tail[table_at:])
    assert "skipped (did not fit the budget or could not run): huge" in "\n".join(tail[table_at:])
    assert all(line.startswith(("|", "skipped (")) or not line for line in tail[table_at:]), tail[table_at:]
    assert tail[table_at - 3].startswith("**")  # the header of the table, after the file list
    # the log holds the children's output as well as the driver's
    log = (out / "gpu_run.log").read_text()
    assert "case sleepy.before_kill" in log and "-> timeout" in log and "-> crashed" in log


def test_total_budget_is_kept(tmp_path):
    """A suite estimated far beyond the budget still gets only what is left, and the driver stops on time."""
    suites = [{"name": "forever", "cmd": [sys.executable, "-c", "import time; print('start', flush=True); time.sleep(300)"],
               "estimate_s": 1000, "first_case_s": 0.5},
              {"name": "next", "cmd": [sys.executable, "-c", "print('next')"], "estimate_s": 1, "first_case_s": 0.5}]
    proc, out, seconds = _drive(tmp_path, "--suites-json", _suites_json(tmp_path, suites), "--budget", "6",
                                "--reserve", "1")
    steps = {s["name"]: s for s in _records(out)["steps"] if s.get("type") == "step"}
    assert steps["forever"]["status"] == "timeout" and steps["forever"]["timeout_s"] <= 5.5
    assert steps["next"]["status"] == "skipped"
    assert "next" in steps["next"]["name"] and "left" in steps["next"]["note"]
    assert seconds < 6 + 8, seconds  # the budget plus the kill grace and interpreter start-up


def test_failed_build_and_gpu_tests_do_not_stop_benchmarks(tmp_path):
    stubs = _write_stubs(tmp_path)
    tests = tmp_path / "gputests"
    tests.mkdir()
    (tests / "test_gpu_stub.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_a_fails():
            assert False

        @pytest.mark.gpu
        def test_b_passes():
            pass

        def test_not_gpu():
            raise RuntimeError("only -m gpu tests run")
    """))
    suites = [{"name": "after", "cmd": [sys.executable, str(stubs / "after.py")], "estimate_s": 5, "first_case_s": 0.1}]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, DRIVER, str(out), "--no-info", "--build-cmd", f"{sys.executable} -c 'raise SystemExit(3)'",
         "--tests-path", str(tests), "--suites-json", _suites_json(tmp_path, suites), "--budget", "120",
         "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, timeout=120, cwd=REPO)
    data = _records(out)
    steps = {s["name"]: s for s in data["steps"] if s.get("type") == "step"}
    assert steps["build"]["status"] == "failed" and steps["build"]["rc"] == 3
    assert "Triton / eager backends" in proc.stdout
    assert steps["gpu-tests"]["status"] == "failed"
    assert "1 failed, 1 passed" in steps["gpu-tests"]["note"]  # no -x: the test after the failure ran too
    assert steps["after"]["status"] == "ok" and [c["name"] for c in data["cases"]] == ["after.case"]


def test_driver_stopped_by_sigterm_still_summarises(tmp_path):
    """The outer `timeout` of gpu_run.sh sends SIGTERM first: the running suite is killed, the summary written."""
    stubs = _write_stubs(tmp_path)
    suites = [{"name": "sleepy", "cmd": [sys.executable, str(stubs / "sleepy.py")], "estimate_s": 100,
               "first_case_s": 0.1}]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, DRIVER, str(out), "--no-build", "--no-info", "--no-tests",
                             "--suites-json", _suites_json(tmp_path, suites), "--results-dir", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=dict(os.environ, STUB_PIDFILE=str(tmp_path / "pid")))
    deadline = time.monotonic() + 30
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.terminate()
    stdout, _ = proc.communicate(timeout=30)
    assert "stopped" in stdout and "| sleepy.before_kill |" in stdout
    steps = {s["name"]: s for s in _records(out)["steps"] if s.get("type") == "step"}
    assert steps["sleepy"]["status"] == "stopped" and steps["sleepy"]["cases"] == 1
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_default_plan_order_and_short_plan_has_no_compile():
    driver = _module("gpu_driver_t", "gpu_driver.py")
    names = [s.name for s in driver.SUITES]
    assert names[:2] == ["heads_ops", "heads"]
    assert names == ["heads_ops", "heads", "group_norm", "attention", "geglu", "unet", "nitro_iteration", "pipeline"]
    for s in driver.SUITES:
        assert os.path.exists(os.path.join(REPO, "benchmarks", s.file)), s.file
    # with the default 8-minute budget no suite can afford its compile baselines
    total = sum(s.estimate_s for s in driver.SUITES)
    assert all(s.compile_s + total > 480 for s in driver.SUITES if s.compile_s)

    class Args:
        budget, reserve, compile, build, tests, tests_timeout = 480.0, 20.0, "auto", True, True, 150.0
    plan = "\n".join(driver.plan_text(driver.SUITES, Args))
    assert "heads_ops" in plan and "expected to be skipped" in plan


def test_driver_help_runs_without_torch_import():
    out = subprocess.run([sys.executable, "-c", f"import runpy, sys; sys.argv = ['x', '--help']\n"
                          f"try:\n runpy.run_path({DRIVER!r}, run_name='__main__')\nexcept SystemExit: pass\n"
                          "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("False"), out.stdout + out.stderr


# --- the harness: cases appended at once, L2 flush and interleaving ------------------------------------------

@pytest.fixture
def harness():
    return _module("bench_harness_t", "harness.py")


def test_recorder_appends_each_case_at_once(tmp_path, harness):
    path = tmp_path / "cases.jsonl"
    rec = harness.Recorder(jsonl=str(path), clock=harness.WallClock())
    rec.compare("a", {"x": 1}, {"fused": lambda: None, "eager": lambda: None}, warmup=0, reps=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["type"] for line in lines] == ["environment", "case"]  # before any later case
    assert lines[1]["name"] == "a" and set(lines[1]["ms"]) == {"fused", "eager"}
    rec.compare("b", {"x": 2}, {"fused": lambda: None}, warmup=0, reps=2)
    assert [json.loads(line)["type"] for line in path.read_text().splitlines()] == ["environment", "case", "case"]


def test_nk_bench_fixture_path_appends_at_once(tmp_path, harness):
    """benchmarks/conftest.py's _Bench (what `nk_bench` returns): pytest-benchmark's call, then the harness."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        conftest = _module("bench_conftest_t", "conftest.py")
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))

    class FakeBenchmark:
        extra_info = {}
        calls = 0

        def pedantic(self, fn, **kwargs):
            FakeBenchmark.calls += 1
            fn()

    path = tmp_path / "cases.jsonl"
    clock = sys.modules["harness"].WallClock()  # the harness conftest imported
    bench = conftest._Bench(FakeBenchmark(), conftest.Recorder(jsonl=str(path), clock=clock))
    result = bench.compare("op.fwd", {"n": 3}, {"fused": lambda: None, "eager": lambda: None}, reps=2, warmup=0,
                           notes="n")
    assert FakeBenchmark.calls == 1 and result.name == "op.fwd" and "eager" in result.speedup
    assert [json.loads(line)["type"] for line in path.read_text().splitlines()] == ["environment", "case"]


class RecordingClock:
    """A fake clock: logs 'flush' and 'mark' in order; time advances by `tick` per mark and by what fns add."""

    def __init__(self, log, tick=1.0):
        self.log, self.t, self.tick = log, 0.0, tick

    def flush(self):
        self.log.append("flush")

    def mark(self):
        self.log.append("mark")
        self.t += self.tick
        return self.t

    def sync(self):
        pass

    def ms(self, a, b):
        return b - a


def test_time_variants_flushes_l2_before_every_timed_call_and_interleaves(harness):
    log = []
    variants = {name: (lambda name=name: log.append(name)) for name in ("fused", "eager", "compile")}
    harness.time_variants(variants, warmup=1, reps=4, min_ms_total=0.0, clock=RecordingClock(log))
    timed = log[log.index("flush"):]
    # every timed call: flush, mark, call, mark -- the flush outside the timed region
    calls = [i for i, e in enumerate(timed) if e in variants]
    assert len(calls) == 3 * (1 + 4)  # the (timed) warm-up call + 4 reps per variant
    for i in calls:
        assert timed[i - 2:i] == ["flush", "mark"] and timed[i + 1] == "mark", timed[i - 2:i + 2]
    # interleaved, in rotated order: the timed rounds are not all one variant first
    rounds = [e for e in timed[calls[3] - 2:] if e in variants]  # after the warm-up
    assert rounds[:6] == ["fused", "eager", "compile", "eager", "compile", "fused"]


def test_time_variants_spreads_slow_variant_repetitions(harness):
    calls = []
    durations = {"fused": 0.01, "slow": 10.0}
    clock = RecordingClock([], tick=0.0)

    def make(name):
        def run():
            calls.append(name)
            clock.t += durations[name]
        return run
    ms = harness.time_variants({k: make(k) for k in durations}, warmup=0, reps=5, min_ms_total=1.0, clock=clock)
    assert ms == pytest.approx(durations)
    timed = calls[2:]  # after the one estimate call each (warmup=0)
    assert timed.count("fused") == 100 and timed.count("slow") == 5  # short op: enough reps for 1 ms in all
    positions = [i for i, name in enumerate(timed) if name == "slow"]
    assert positions[0] > 10 and positions[-1] > 80  # spread over the rounds, not bunched at the start


def test_compile_switch(harness, monkeypatch):
    monkeypatch.delenv("NITROKERNELS_BENCH_COMPILE", raising=False)
    assert harness.compile_baselines()
    monkeypatch.setenv("NITROKERNELS_BENCH_COMPILE", "0")
    assert not harness.compile_baselines()


def test_gpu_run_sh_passes_budget_and_options(tmp_path):
    suites = [{"name": "one", "cmd": [sys.executable, "-c", "print('suite one ran')"], "estimate_s": 1,
               "first_case_s": 0.1}]
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_run.sh"), str(out), "30", "--no-build",
                           "--no-info", "--no-tests", "--suites-json", _suites_json(tmp_path, suites),
                           "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "budget 30 s" in proc.stdout and "suite one ran" in proc.stdout
    assert sorted(os.listdir(out)) == ["cases.jsonl", "gpu_run.log", "unknown-" + time.strftime("%Y-%m-%d") + ".md"]


def test_cuda_clock_flush_zeroes_a_buffer_larger_than_the_l2(harness, monkeypatch):
    import torch

    assert harness.L2_FLUSH_BYTES >= 4 * 60 * 2**20  # the H200's L2 is 60 MB
    buffer = torch.ones(16, dtype=torch.int32)  # stands in for the 256 MB CUDA buffer
    monkeypatch.setattr(harness, "_flush_buffer", lambda: buffer)
    monkeypatch.delenv("NITROKERNELS_BENCH_L2_FLUSH", raising=False)
    harness.CudaClock().flush()
    assert int(buffer.sum()) == 0
    buffer.fill_(1)
    monkeypatch.setenv("NITROKERNELS_BENCH_L2_FLUSH", "0")
    harness.CudaClock().flush()
    assert int(buffer.sum()) == 16
