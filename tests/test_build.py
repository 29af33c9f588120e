"""The build path: every CUDA source compiles (nvcc, sm_90a, torch headers) and setup.py degrades cleanly."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from nitrokernels import build_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("nitrokernels_setup", os.path.join(REPO, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() only runs as __main__
    return module


def test_there_are_cuda_sources_to_build():
    sources = [os.path.relpath(p, REPO) for p in build_check.cuda_sources()]
    assert "csrc/bindings.cpp" in sources
    assert any(p.endswith(".cu") for p in sources), sources


@pytest.mark.skipif(build_check.find_nvcc() is None, reason="nvcc not installed")
def test_every_cuda_source_compiles_for_sm90a():
    results = build_check.check(build_check.cuda_sources(), arch="sm_90a", jobs=2)
    failures = {os.path.relpath(path, REPO): output[-3000:] for path, code, output in results if code != 0}
    assert not failures, "\n\n".join(f"{path}:\n{out}" for path, out in failures.items())


def test_setup_skips_the_extension_with_a_reason_on_cpu_torch(monkeypatch):
    import torch

    setup = _load_setup_module()
    monkeypatch.delenv("NITROKERNELS_BUILD_EXT", raising=False)
    ext, info = setup._extension_plan()
    if torch.version.cuda is None:
        assert ext is None and not info["built"]
        assert "CPU-only" in info["reason"]
    monkeypatch.setenv("NITROKERNELS_BUILD_EXT", "0")
    ext, info = setup._extension_plan()
    assert ext is None and "NITROKERNELS_BUILD_EXT=0" in info["reason"]


def test_forced_build_without_cuda_fails_loudly(monkeypatch, tmp_path):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: the forced build would succeed")
    setup = _load_setup_module()
    monkeypatch.setenv("NITROKERNELS_BUILD_EXT", "1")
    monkeypatch.setattr(setup, "BUILD_INFO", str(tmp_path / "info.json"))
    with pytest.raises(SystemExit, match="cannot be built"):
        setup.main()


# ================================================================ Triton kernels: sm_90a compile, no GPU
H100_SHARED_LIMIT = 227 * 1024
# Spill bytes a 16-bit kernel may have. Plain launches: _gn_bwd_finalize spills up to 20 B (fp32 partial
# sums, BLOCK_CG 128). Autotuned kernels: some candidate configs spill a lot (flash attention's D=128 and
# BLOCK_N=128 dK/dV configs, hundreds of bytes), which only makes them lose the autotuning; what must hold is
# that every autotuned call has a spill-free config to pick (checked per call below).
PLAIN_SPILL_LIMIT = 32
# The other dtypes (float16 everywhere, float32 group_norm) take as long again; CI compiles bf16 only, by hand:
#     TRITON_INTERPRET= python tests/sm90_compile.py group_norm attention geglu float16 float32
CI_DTYPE = "bfloat16"
# kernels each family's host code must launch (the recording reached them all)
FAMILY_KERNELS = {
    "group_norm": {"_gn_stats", "_gn_finalize", "_gn_apply", "_gn_bwd_reduce", "_gn_bwd_finalize", "_gn_bwd_apply"},
    "attention": {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"},
    "geglu": {"_geglu_fwd", "_geglu_bwd_act"},
}
# the matmul kernels: every launch must run on Hopper's tensor cores (wgmma), not fall back to mma.sync
WGMMA_KERNELS = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_geglu_fwd"}


_COMPILED: dict = {}   # (family, dtype) -> JSON lines, once per session: the compile and hot-loop tests share it


def _family_lines(family: str) -> list[dict]:
    if family not in _COMPILED:
        _COMPILED[family] = _sm90_compile(family, CI_DTYPE)
    return _COMPILED[family]


def _sm90_compile(*argv) -> list[dict]:
    """tests/sm90_compile.py in a subprocess (compiling needs the interpreter off); its JSON lines."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sm90_compile.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_KERNELS))
def test_triton_kernels_compile_for_h100(family):
    """Every launch the family's host code makes at SDXL shapes (forward + backward, every autotune
    candidate) compiles for sm_90a and fits in shared memory; spills stay within the budget above."""
    lines = _family_lines(family)
    results = [r for r in lines if "kernel" in r]
    assert {r["kernel"] for r in results} == FAMILY_KERNELS[family]
    for r in results:
        what = f"{r['kernel']} {r['dtype']} {r['constexprs']} {r['options']}"
        assert r["shared"] <= H100_SHARED_LIMIT, f"{what}: {r['shared']} bytes of shared memory"
    tuned = {r["tuning"] for r in lines if "tuning" in r}
    for r in results:
        if r["kernel"] not in tuned:
            assert r["spill_bytes"] <= PLAIN_SPILL_LIMIT, f"{r['kernel']} {r['constexprs']}: {r['spill_bytes']} B"
    for t in (r for r in lines if "tuning" in r):
        assert t["min_spill_bytes"] == 0, f"every config of {t['tuning']} {t['constexprs']} spills"
    for r in results:
        if r["kernel"] in WGMMA_KERNELS:
            assert r["wgmma"], f"{r['kernel']} {r['constexprs']} {r['options']}: no wgmma"


# ============================================================ sm_90a SASS: the tensor-core hot loops, no GPU
# Every HGMMA hot loop (nitrokernels._sass: innermost backward branch holding HGMMA) at SDXL shapes must have:
# no scalar global loads staged through registers into shared memory, >= 1 MMA group in flight across the
# iteration (no WARPGROUP.DEPBAR.LE gsb0, 0x0), no local memory, MUFU + integer pipe cycles <= 0.5 x MMA cycles
# (_sass.problems). Autotuned calls: at least one candidate config must pass (the others only lose the tuning).
#
# Attention is held to what its algorithm allows instead of two of these rules, and nothing else:
#  * its loops chain two dots (S = Q K^T, softmax, P V): S must be complete before the softmax, so every
#    iteration waits for it (gsb0, 0x0); overlapping it needs ping-pong warpgroups (FA3), which Triton 3.9's
#    pipeliner does not generate;
#  * one exp per score is the algorithm: with head dim D the MMA work per score is 4·D FLOPs, i.e. 1/16 SM
#    cycle at D = 64, the same as one MUFU.EX2 (16 per SM per cycle). The rule there: at most 1.1 MUFU per
#    score (+8 per warp for the row maxima / rescales), and integer cycles <= 0.5 x MMA cycles.
CHAINED_MMA_KERNELS = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}


def _hot_loop_problems(family: str, r: dict) -> list[str]:
    """The refusals of one compiled launch's hot loops under the family's rules (see above)."""
    out = []
    for loop in r.get("hot_loops", []):
        where = f"{r['kernel']} {r['constexprs']} {r['options']} loop {loop['start']:#x}-{loop['end']:#x}"
        problems = loop["problems"]
        if r["kernel"] in CHAINED_MMA_KERNELS:
            problems = [p for p in problems if "no MMA in flight" not in p and "MUFU + integer" not in p]
            c = r["constexprs"]
            scores = c["BLOCK_M"] * c["BLOCK_N"] / (32 * r["num_warps"])
            if loop["mufu"] > 1.1 * scores + 8:
                problems.append(f"{loop['mufu']} MUFU per warp for {scores:.0f} scores per thread")
            if loop["cycles"]["integer"] > 0.5 * loop["cycles"]["mma"]:
                problems.append(f"integer cycles {loop['cycles']['integer']:.0f} > 0.5 x MMA {loop['cycles']['mma']:.0f}")
        out += [f"{where}: {p}" for p in problems]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    "heads", "attention", "geglu", "group_norm"])
def test_tensor_core_hot_loops_in_sass(family):
    """The hot-loop rules above on every launch the family's host code makes at SDXL shapes (bf16, sm_90a)."""
    lines = _family_lines(family)
    results = {r["id"]: r for r in lines if "kernel" in r}
    assert results, f"{family}: nothing compiled"
    tunings = [t for t in lines if "tuning" in t]
    tuned = {i for t in tunings for i in t["ids"]}
    failures = [p for i, r in results.items() if i not in tuned for p in _hot_loop_problems(family, r)]
    for t in tunings:
        per_config = [_hot_loop_problems(family, results[i]) for i in t["ids"]]
        if all(per_config):
            failures.append(f"every config of {t['tuning']} {t['constexprs']} fails: {min(per_config, key=len)}")
    assert not failures, f"{len(failures)} failing hot loops:\n" + "\n".join(failures[:40])
    loops = [loop for r in results.values() for loop in r.get("hot_loops", [])]
    if family in WGMMA_FAMILIES:
        assert loops, f"{family}: no HGMMA hot loop found in the SASS"
    else:
        assert not loops, f"{family}: unexpected HGMMA loops"


WGMMA_FAMILIES = {"heads", "attention", "geglu"}


SHIPPED_ASSETS = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "nitrokernels", "digits", "assets", "*"))}


def test_package_data_and_manifest_cover_the_digits_assets():
    """Every file of the digits demo's assets (nitrokernels/digits/assets/) is matched by pyproject's package-data
    (wheels) and MANIFEST.in (the sdist), and nothing is left at the pre-split path nitrokernels/assets/."""
    import fnmatch
    import tomllib

    assert len(SHIPPED_ASSETS) == 3 and not os.path.exists(os.path.join(REPO, "nitrokernels", "assets"))
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["nitrokernels"]
    manifest = [line.split() for line in open(os.path.join(REPO, "MANIFEST.in")) if line.startswith("recursive-include")]
    for asset in SHIPPED_ASSETS:
        inside = os.path.relpath(asset, "nitrokernels").replace(os.sep, "/")
        assert any(fnmatch.fnmatch(inside, pattern) for pattern in package_data), (asset, package_data)
        assert any(asset.startswith(folder + os.sep) and any(fnmatch.fnmatch(os.path.basename(asset), g) for g in globs)
                   for _, folder, *globs in manifest), asset


@pytest.mark.slow
def test_sdist_ships_the_sources_and_installs(tmp_path):
    """The source distribution carries csrc/ (its extension sources), the assets and py.typed, and a
    `pip install <sdist>` of it works (here without CUDA: the pure package, with the reason in _build_info)."""
    import tarfile

    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = dist.glob("nitrokernels-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    sources = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "csrc", "**", "*.c*"), recursive=True)}
    assert sources and sources <= names, sorted(sources - names)
    assert {"nitrokernels/py.typed", "MANIFEST.in", *SHIPPED_ASSETS} <= names
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(sdist)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "NITROKERNELS_BUILD_EXT": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = ("import nitrokernels, os; from nitrokernels import _ext; d = os.path.dirname(nitrokernels.__file__); "
             "assert os.path.exists(os.path.join(d, 'py.typed')); "
             f"assert all(os.path.isfile(os.path.join(d, '..', a)) for a in {sorted(SHIPPED_ASSETS)!r}); "
             "print(d, _ext.build_info().get('reason'))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert proc.returncode == 0 and str(target) in proc.stdout, proc.stderr[-3000:]
