"""Command line: `nitrokernels info | demo | distill | generate | bench` (also `python -m nitrokernels ...`)."""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Subcommands implemented elsewhere: module with add_arguments(parser) and run(args) -> int.
DELEGATED = {
    "demo": ("nitrokernels.digits.demo",
             "distil the embedded digits teacher into a one-step student with a NitroFusion head pool "
             "and evaluate it (the main job; runs on a CPU in minutes)"),
    "distill": ("nitrokernels.nitro.distill_cli",
                "train a one-step NitroFusion student from local teacher/student models and a prompt file "
                "(--preset digits runs on a CPU; torchrun for several GPUs; --dry-run: memory per GPU)"),
    "generate": ("nitrokernels.nitro.generate",
                 "generate images in 1-4 steps (NitroSD weights from local paths, or the embedded digits model)"),
}


# optional dependency (top-level module) -> the extra that installs it (pyproject.toml)
EXTRA_OF = {"diffusers": "nitro", "transformers": "nitro", "sklearn": "nitro", "matplotlib": "nitro",
            "PIL": "nitro", "pytest": "test", "pytest_benchmark": "test", "peft": "lora"}


def _add_info(sub):
    p = sub.add_parser("info", help="versions, GPU, CUDA extension, Triton, and which backend each op uses",
                       description="Print versions, the GPU, whether the CUDA extension is built (and for which "
                                   "architectures), Triton availability, and per op the backend that would run on "
                                   "this machine and why the others would not.")
    p.add_argument("--json", action="store_true", help="print the same information as JSON")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from nitrokernels import info

    if args.json:
        import json
        print(json.dumps(info.collect(), indent=2, default=str))
    else:
        info.print_info()
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="run the GPU benchmark suites (fused vs eager/compile baselines, same run)",
                       description="Run benchmarks/bench_*.py with pytest-benchmark, one suite at a time with a "
                                   "progress bar. Each suite times the fused path and its baselines in the same run "
                                   "and appends to benchmarks/results/<gpu>-<date>.json. Needs a CUDA GPU and a "
                                   "source checkout (the benchmarks are not installed with the package).")
    p.add_argument("suites", nargs="*", help="suite names, e.g. group_norm heads (default: all)")
    p.add_argument("--path", default=os.path.join(REPO_ROOT, "benchmarks"), help="benchmarks folder")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select cases")
    p.add_argument("--out", default=None, help="also write the results JSON into this folder")
    p.add_argument("--report", action="store_true", help="render the markdown table and PNG chart afterwards")
    p.add_argument("--predict", action="store_true",
                   help="no GPU needed: print the static cost model's predicted time and fraction of bf16 peak "
                        "per launch and in total for every heads benchmark case (benchmarks/cost_model.py: "
                        "sm_90a SASS of every launch), beside the measured time when a results JSON has one")
    p.set_defaults(func=_run_bench)


def _run_predict(args) -> int:
    script = os.path.join(args.path, "cost_model.py")
    if not os.path.exists(script):
        print(f"nitrokernels bench --predict: no {script} (a source checkout is needed)", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compiling needs the interpreter off
    return subprocess.call([sys.executable, script], env=env)


def _bench_suites(path: str, names: list[str]) -> list[str]:
    available = sorted(glob.glob(os.path.join(path, "bench_*.py")))
    if not names:
        return available
    by_name = {os.path.basename(f)[len("bench_"):-3]: f for f in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"nitrokernels bench: unknown suite(s) {unknown}; available: {sorted(by_name)}")
    return [by_name[n] for n in names]


def _run_bench(args) -> int:
    if args.predict:
        return _run_predict(args)
    import torch
    from tqdm import tqdm

    if not os.path.isdir(args.path):
        print(f"nitrokernels bench: no benchmarks folder at {args.path} (pass --path; benchmarks live in a "
              "source checkout, not in the installed package)", file=sys.stderr)
        return 2
    try:  # unknown suite names are an error on every machine (before the GPU check)
        suites = _bench_suites(args.path, args.suites)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    if not suites:
        print(f"nitrokernels bench: no bench_*.py suites in {args.path}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("nitrokernels bench: no CUDA GPU here; the benchmarks time GPU kernels and are skipped.")
        return 0
    env = dict(os.environ, **({"NITROKERNELS_BENCH_OUT": args.out} if args.out else {}))
    failed = []
    for suite in (bar := tqdm(suites, desc="benchmarks", unit="suite")):
        bar.set_postfix_str(os.path.basename(suite))
        cmd = [sys.executable, "-m", "pytest", suite, "--benchmark-only", "-q", "-p", "no:cacheprovider"]
        if args.keyword:
            cmd += ["-k", args.keyword]
        if subprocess.call(cmd, cwd=os.path.dirname(args.path), env=env) not in (0, 5):
            failed.append(os.path.basename(suite))
    if args.report:
        subprocess.call([sys.executable, os.path.join(args.path, "report.py")])
    if failed:
        print(f"nitrokernels bench: failed suites: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _add_delegated(sub, name: str, module: str, help_text: str, chosen: bool):
    p = sub.add_parser(name, help=help_text, description=help_text)
    if not chosen:  # import the (diffusers-heavy) module only for the command being run
        return
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        # Keep `--help` and the other subcommands working when optional dependencies are missing.
        missing = err

        def unavailable(args, _err=missing) -> int:
            print(f"nitrokernels {name}: unavailable ({_err}). Install the NitroFusion extras: "
                  "pip install 'nitrokernels[nitro]'", file=sys.stderr)
            return 2

        p.set_defaults(func=unavailable)
        return
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="nitrokernels", description=__doc__)
    from nitrokernels import __version__
    parser.add_argument("--version", action="version", version=f"nitrokernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{info,demo,distill,generate,bench}")
    _add_info(sub)
    for name, (module, help_text) in DELEGATED.items():
        _add_delegated(sub, name, module, help_text, chosen=(name == command))
    _add_bench(sub)
    return parser


SEED_LIMIT = 2 ** 63 - 2 ** 20  # torch generators take < 2**64; the commands add offsets to the seed


class UsageError(Exception):
    """A bad command-line value: printed as one line, exit status 2."""


def cuda_device_problem(device) -> str | None:
    """Why the CUDA `device` (a torch.device) cannot be used here (a torch built without CUDA, no GPU, an index
    past the GPUs), or None (also for non-CUDA devices). The one check behind every --device and
    nitro.pipeline.resolve_device."""
    import torch

    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is available here"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def check_common_args(args) -> None:
    """Checks of the options several subcommands share (--device, --threads, --seed, --out, --num-images),
    made before anything is loaded. Raises UsageError naming the option and the value."""
    device = getattr(args, "device", None)
    if device is not None:
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise UsageError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        problem = cuda_device_problem(dev)
        if problem:
            raise UsageError(f"--device {device}: {problem} (use --device cpu)")
        if dev.type not in ("cpu", "cuda", "mps", "xpu"):
            raise UsageError(f"--device {device}: unsupported device type {dev.type!r} (use cpu or cuda)")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in [0, 2**63 - 2**20), got {seed}")
    for name in ("out", "save_student"):
        path = getattr(args, name, None)
        if not isinstance(path, str) or path == "__asset__":
            continue
        flag = "--" + name.replace("_", "-")
        probe = os.path.abspath(path if name == "out" else os.path.dirname(os.path.abspath(path)))
        if name == "out" and os.path.exists(probe) and not os.path.isdir(probe):
            raise UsageError(f"{flag} {path}: exists and is not a folder")
        parent = probe
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise UsageError(f"{flag} {path}: {parent} is a file, so no folder can be made under it")
        if parent and not os.access(parent, os.W_OK):
            raise UsageError(f"{flag} {path}: {parent} is not writable")


def main(argv=None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        check_common_args(args)
    except UsageError as err:
        print(f"nitrokernels {args.command}: {err}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:      # a lazy import of an optional dependency, deep inside a command
        extra = EXTRA_OF.get((err.name or "").split(".")[0])
        if extra is None or os.environ.get("NITROKERNELS_DEBUG"):
            raise
        print(f"nitrokernels {args.command}: needs the module {err.name!r}, which is not installed: "
              f"pip install 'nitrokernels[{extra}]'", file=sys.stderr)
        return 2
    except (OSError, ValueError, UsageError) as err:
        # user-facing failures (files, bad values) as one line; NITROKERNELS_DEBUG=1 shows the traceback
        if os.environ.get("NITROKERNELS_DEBUG"):
            raise
        print(f"nitrokernels {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
