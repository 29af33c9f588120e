"""One GPU session within a time budget: build, GPU tests, then the benchmark suites one process each.

    python benchmarks/gpu_driver.py OUT_DIR [--budget 480] [--compile auto|on|off] [--suites heads_ops,heads,...]

(benchmarks/gpu_run.sh calls this.) Steps, in order, each in its own process group under its own timeout:

  build       NITROKERNELS_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .   (a failure is recorded;
              the benchmarks then run on the Triton / eager backends)
  info        python -m nitrokernels info  -> OUT_DIR/info.txt
  gpu-tests   pytest tests -m gpu (no -x; pytest-timeout per test when installed)
  <suite>...  one pytest process per benchmark suite, in priority order (SUITES below): heads first

The budget (seconds, counted from the driver's start) is planned against per-suite estimates for an H200: a
suite runs if the time left is at least what it needs to finish its first case, under a timeout of
min(slack x estimate, time left); a suite that cannot fit is skipped and reported. torch.compile baselines
(NITROKERNELS_BENCH_COMPILE) are on for a suite only with --compile on, or with --compile auto (the default)
when the time left covers that suite with its compile baselines *and* every later suite without them -- so the
default 8-minute plan runs none. A CUDA error in one suite cannot poison the next: each is a new process.

Every measured case is appended to OUT_DIR/cases.jsonl by the harness as soon as it finishes (flushed, fsync'd),
and every step's outcome by the driver, so a run cut off at any point keeps all it measured. All output goes to
the terminal and to OUT_DIR/gpu_run.log as it comes. At the end the driver builds <gpu>-<date>.json (in OUT_DIR
and benchmarks/results/) from the JSONL, renders <gpu>-<date>.md/.png and prints the summary table last.
OUT_DIR holds at most 8 files: gpu_run.log, cases.jsonl, info.txt, <gpu>-<date>.json/.md/.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
import report  # noqa: E402  (pure Python: JSONL I/O, results JSON, table)

LOG_NAME, JSONL_NAME, INFO_NAME = "gpu_run.log", "cases.jsonl", "info.txt"
MAX_OUT_FILES = 8


@dataclasses.dataclass
class Suite:
    """One benchmark process. Estimates are seconds on an H200 with a warm Triton cache from the GPU tests
    (guesses until the first run measures them: the log and the JSONL record each suite's real time)."""

    name: str
    file: str = ""               # pytest file under benchmarks/ (or absolute); or give `cmd`
    k: str = ""                  # pytest -k expression
    estimate_s: float = 60.0     # whole suite without torch.compile baselines
    compile_s: float = 0.0       # extra with them (0: the suite has none)
    first_case_s: float = 20.0   # process start + setup + first case: less time left than this is useless
    cmd: list | None = None      # a full command instead of pytest (stub suites in tests)


SUITES = [
    Suite("heads_ops", "bench_heads_ops.py", estimate_s=90, first_case_s=45),
    Suite("heads", "bench_heads.py", estimate_s=90, first_case_s=45),
    Suite("group_norm", "bench_group_norm.py", estimate_s=60, compile_s=240, first_case_s=20),
    Suite("attention", "bench_attention.py", k="test_attention", estimate_s=60, first_case_s=20),
    Suite("geglu", "bench_attention.py", k="test_geglu", estimate_s=40, compile_s=90, first_case_s=20),
    Suite("unet", "bench_unet.py", estimate_s=150, compile_s=240, first_case_s=90),
    Suite("nitro_iteration", "bench_nitro_iteration.py", estimate_s=180, first_case_s=150),
    Suite("pipeline", "bench_pipeline.py", estimate_s=240, first_case_s=180),
]
BUILD_ESTIMATE_S, INFO_ESTIMATE_S, TESTS_ESTIMATE_S = 100, 15, 120


class Budget:
    def __init__(self, seconds: float, reserve: float):
        self.start, self.seconds, self.reserve = time.monotonic(), seconds, reserve

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left for steps (the reserve for the summary excluded)."""
        return self.seconds - self.reserve - self.elapsed()


class Log:
    """Tee: every line to stdout and to the log file, flushed at once."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1, errors="replace")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.file.write(text)
            self.file.flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")


class _Stop(Exception):
    """The driver itself was asked to stop (SIGTERM / SIGINT): kill the child, write the summary."""


def run_step(log: Log, cmd: list, timeout: float, env: dict, cwd: str = REPO, capture: list | None = None) -> tuple:
    """Run `cmd` in a new process group, its output teed line by line; (status, rc, seconds, last lines).

    status: ok | failed (rc != 0) | crashed (killed by a signal: abort, segfault) | timeout (killed by us)."""
    started = time.monotonic()
    tail: list[str] = []
    log.line(f"$ {' '.join(shlex.quote(str(c)) for c in cmd)}    (timeout {timeout:.0f} s)")
    try:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as err:
        log.line(f"!! could not start: {err}")
        return "failed", None, 0.0, [str(err)]

    def pump():
        for raw in iter(proc.stdout.readline, b""):
            text = raw.decode("utf-8", errors="replace")
            log.write(text)
            tail.append(text.rstrip("\n"))
            del tail[:-40]
            if capture is not None:
                capture.append(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    try:
        proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        status = "timeout"
    except _Stop:
        status = "stopped"
    _kill_group(proc)  # after a normal exit too: leftovers of the group (compile workers) go with it
    reader.join(timeout=5)
    rc = proc.returncode
    if status is None:
        status = "ok" if rc == 0 else ("crashed" if rc is not None and rc < 0 else "failed")
    seconds = time.monotonic() - started
    log.line(f"-> {status} (rc {rc}, {seconds:.1f} s)")
    return status, rc, seconds, tail


def _signal_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(proc, grace: float = 5.0) -> None:
    """SIGTERM (then SIGKILL after `grace`) to the process if it still runs; SIGKILL to what is left of its group."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


_SUMMARY = re.compile(r"\b\d+ (passed|failed|error|errors|skipped|deselected|xfailed|xpassed)\b")


def pytest_summary(lines: list[str]) -> str:
    for line in reversed(lines):
        if _SUMMARY.search(line) or "no tests ran" in line:
            return line.strip("= ").strip()[:300]
    return ""


def count_cases(jsonl: str, suite: str) -> int:
    if not os.path.exists(jsonl):
        return 0
    n = 0
    with open(jsonl, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("type") == "case" and record.get("suite") == suite:
                n += 1
    return n


def driver_environment() -> dict:
    """What the driver knows without importing torch (the suites' harness adds the rest)."""
    env = {"python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": _commit(), "host": platform.node()}
    from importlib import metadata
    for name in ("torch", "triton", "diffusers", "transformers", "pytest-timeout"):
        try:
            env[name.replace("-", "_") if name != "torch" and name != "triton" else name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        if out.returncode == 0 and out.stdout.strip():
            name, memory, driver = (part.strip() for part in (out.stdout.splitlines()[0].split(",") + ["", ""])[:3])
            env.update(gpu=name, gpu_memory=memory, driver=driver)
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def _commit() -> str | None:
    if os.environ.get("NITROKERNELS_COMMIT"):
        return os.environ["NITROKERNELS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def load_suites(args) -> list[Suite]:
    suites = SUITES
    if args.suites_json:
        with open(args.suites_json) as f:
            suites = [Suite(**spec) for spec in json.load(f)]
    if args.suites:
        by_name = {s.name: s for s in suites}
        unknown = [n for n in args.suites if n not in by_name]
        if unknown:
            raise SystemExit(f"gpu_driver: unknown suite(s) {unknown}; known: {list(by_name)}")
        suites = [by_name[n] for n in args.suites]
    return suites


def plan_text(suites: list[Suite], args) -> list[str]:
    """The plan as expected from the estimates (the real decisions are taken as the time is spent)."""
    t = 0.0
    lines = [f"budget {args.budget:.0f} s (summary reserve {args.reserve:.0f} s), compile baselines: {args.compile}"]
    for name, est, on in (("build", BUILD_ESTIMATE_S, args.build), ("info", INFO_ESTIMATE_S, getattr(args, "info", True)),
                          ("gpu-tests", min(TESTS_ESTIMATE_S, args.tests_timeout), args.tests)):
        if on:
            t += est
            lines.append(f"  {name:<16} ~{est:>4.0f} s   (by {t:>4.0f} s)")
    limit = args.budget - args.reserve
    for s in suites:
        if limit - t < s.first_case_s:
            lines.append(f"  {s.name:<16} ~{s.estimate_s:>4.0f} s   expected to be skipped (would start at {t:.0f} s)")
            continue
        lines.append(f"  {s.name:<16} ~{s.estimate_s:>4.0f} s   (by {min(t + s.estimate_s, limit):>4.0f} s)"
                     + ("   partial: budget ends first" if t + s.estimate_s > limit else "")
                     + (f"   [+{s.compile_s:.0f} s with compile baselines]" if s.compile_s else ""))
        t += s.estimate_s
    return lines


def suite_command(s: Suite, args) -> list:
    if s.cmd:
        return list(s.cmd)
    path = s.file if os.path.isabs(s.file) else os.path.join(BENCH_DIR, s.file)
    cmd = [sys.executable, "-m", "pytest", path, "-q", "-rfEs", "-p", "no:cacheprovider"]
    cmd += ["--benchmark-disable"] if not args.pytest_benchmark else ["--benchmark-only", "--benchmark-disable-gc"]
    if s.k:
        cmd += ["-k", s.k]
    return cmd


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NITROKERNELS_BENCH_OUT", None)  # the driver writes the results; children only append cases
    env.pop("PYTEST_CURRENT_TEST", None)      # (when the driver itself runs under pytest: the CPU tests)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, BENCH_DIR, env.get("PYTHONPATH", "")) if p)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480 = 8 min)")
    parser.add_argument("--reserve", type=float, default=20.0, help="seconds kept for the summary (default 20)")
    parser.add_argument("--slack", type=float, default=1.5, help="a suite's timeout = slack x its estimate, at most the time left")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile baselines: auto = only where the budget allows (default)")
    parser.add_argument("--suites", type=lambda s: [x for x in s.split(",") if x], default=None,
                        help="comma-separated suite names, in the order to run (default: all, priority order)")
    parser.add_argument("--suites-json", default=None, help="a JSON list of Suite fields replacing the suite table")
    parser.add_argument("--no-build", dest="build", action="store_false", help="skip the CUDA extension build")
    parser.add_argument("--build-cmd", default=None, help="the build command (default: pip install -e . with _C)")
    parser.add_argument("--build-timeout", type=float, default=180.0)
    parser.add_argument("--no-info", dest="info", action="store_false")
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="skip the -m gpu tests")
    parser.add_argument("--tests-path", default=os.path.join(REPO, "tests"))
    parser.add_argument("--tests-timeout", type=float, default=150.0, help="the whole -m gpu run (default 150 s)")
    parser.add_argument("--test-timeout", type=float, default=60.0, help="one GPU test (pytest-timeout; default 60 s)")
    parser.add_argument("--pytest-benchmark", action="store_true",
                        help="also let pytest-benchmark time the fused variant (default: --benchmark-disable)")
    parser.add_argument("--results-dir", default=report.RESULTS_DIR, help="where the results JSON is also written")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, JSONL_NAME)
    log = Log(os.path.join(out, LOG_NAME))
    budget = Budget(args.budget, args.reserve)
    suites = load_suites(args)

    def on_signal(signum, frame):
        raise _Stop(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    env_info = driver_environment()
    plan = plan_text(suites, args)
    log.line(f"== nitrokernels GPU run: {env_info.get('gpu', 'no GPU seen by nvidia-smi')}, commit "
             f"{str(env_info.get('commit'))[:10]}, output {out}")
    for line in plan:
        log.line(line)
    report.append_jsonl(jsonl, {"type": "run", "environment": env_info, "budget_s": args.budget,
                                "compile": args.compile, "plan": plan, "argv": sys.argv[1:] if argv is None else argv})
    failures = []

    def step(name: str, cmd: list, timeout: float, env: dict, capture=None, **record) -> str:
        log.line(f"\n== {name}  ({budget.elapsed():.0f} s elapsed, {budget.left():.0f} s left)")
        status, rc, seconds, tail = run_step(log, cmd, timeout, env, capture=capture)
        note = pytest_summary(tail) or (tail[-1][:300] if tail and status != "ok" else "")
        record = {"type": "step", "name": name, "status": status, "rc": rc, "seconds": round(seconds, 1),
                  "timeout_s": round(timeout, 1), "note": note, **record}
        if "suite" in record:
            record["cases"] = count_cases(jsonl, record["suite"])
            log.line(f"   {name}: {record['cases']} case(s) in {JSONL_NAME}"
                     + (" (cut off by its timeout)" if status == "timeout" else ""))
        report.append_jsonl(jsonl, record)
        if status != "ok":
            failures.append(name)
        if status == "stopped":
            raise _Stop(name)
        return status

    def skip(name: str, why: str) -> None:
        log.line(f"\n== {name}: skipped ({why})")
        report.append_jsonl(jsonl, {"type": "step", "name": name, "status": "skipped", "seconds": 0, "note": why})

    try:
        if args.build:
            cmd = shlex.split(args.build_cmd) if args.build_cmd else \
                [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", REPO]
            timeout = min(args.build_timeout, budget.left())
            status = step("build", cmd, timeout, child_env(NITROKERNELS_BUILD_EXT="1",
                                                           MAX_JOBS=os.environ.get("MAX_JOBS", "16"),
                                                           TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")))
            if status != "ok":
                log.line("!! the CUDA extension build did not succeed: the benchmarks run on the Triton / eager "
                         "backends (the info step and every case's environment say which backend ran)")
        if args.info:
            captured: list[str] = []
            step("info", [sys.executable, "-m", "nitrokernels", "info"], min(60.0, max(budget.left(), 1.0)),
                 child_env(), capture=captured)
            with open(os.path.join(out, INFO_NAME), "w") as f:
                f.write("".join(captured))
        if args.tests:
            if budget.left() < 30:
                skip("gpu-tests", f"{budget.left():.0f} s left")
            else:
                cmd = [sys.executable, "-m", "pytest", args.tests_path, "-m", "gpu", "-q", "-rfEs",
                       "-p", "no:cacheprovider"]
                if importlib.util.find_spec("pytest_timeout") is not None:
                    cmd += [f"--timeout={args.test_timeout:.0f}"]
                step("gpu-tests", cmd, min(args.tests_timeout, budget.left()), child_env())

        for i, s in enumerate(suites):
            left = budget.left()
            later = sum(t.estimate_s for t in suites[i + 1:])
            with_compile = bool(s.compile_s) and (
                args.compile == "on" or (args.compile == "auto" and left >= s.estimate_s + s.compile_s + later))
            estimate = s.estimate_s + (s.compile_s if with_compile else 0.0)
            if left < s.first_case_s:
                skip(s.name, f"needs ~{s.first_case_s:.0f} s for its first case (~{estimate:.0f} s in all), "
                             f"{max(left, 0):.0f} s left")
                continue
            timeout = min(args.slack * estimate, left)
            step(s.name, suite_command(s, args), timeout,
                 child_env(NITROKERNELS_BENCH_JSONL=jsonl, NITROKERNELS_BENCH_SUITE=s.name,
                           NITROKERNELS_BENCH_COMPILE="1" if with_compile else "0"),
                 suite=s.name, compile=with_compile, estimate_s=estimate)
    except _Stop as why:
        log.line(f"\n!! stopped ({why}): writing the summary of what finished")
        failures.append("stopped")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        summarise(log, out, jsonl, env_info, args, budget, failures)
    return 0 if not failures else 1


def summarise(log: Log, out: str, jsonl: str, env_info: dict, args, budget: Budget, failures: list) -> None:
    report.append_jsonl(jsonl, {"type": "end", "seconds": round(budget.elapsed(), 1), "failed": failures})
    data = report.load_jsonl(jsonl)
    data["environment"] = {**env_info, **data["environment"]}
    name = report.results_name(data["environment"])
    stem = os.path.splitext(name)[0]
    written = []
    if data["cases"]:
        extra = {"steps": data["steps"], "budget_s": args.budget}
        written.append(report.write_results(out, data["environment"], data["cases"], extra))
        if args.results_dir:
            try:
                written.append(report.write_results(args.results_dir, data["environment"], data["cases"], extra))
            except OSError as err:
                log.line(f"!! could not write into {args.results_dir}: {err}")
    try:
        table, what = report.render(data, out, stem)
    except Exception as err:  # noqa: BLE001 -- the table is printed below in any case
        table, what = report.markdown_table(data), f"render failed: {type(err).__name__}: {err}"
    files = sorted(os.listdir(out))
    log.line(f"\n== summary ({budget.elapsed():.0f} s): {len(data['cases'])} case(s); results {', '.join(written) or 'none'}; {what}")
    if len(files) > MAX_OUT_FILES:
        log.line(f"!! {len(files)} files in {out} (at most {MAX_OUT_FILES} come back): {files}")
    log.line(f"files in {out}: {', '.join(files)}")
    if failures:
        log.line(f"steps not ok: {', '.join(failures)}")
    log.line("")
    log.line(table)


if __name__ == "__main__":
    raise SystemExit(main())
