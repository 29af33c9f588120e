"""How many distinct Triton compilations the heads kernels need across per-level head-count mixes (no GPU).

    TRITON_INTERPRET= python tests/heads_compile_count.py [mixes]    -> one JSON line on stdout

Runs the multi-level forward + backward host code (nitrokernels.kernels.heads) on `meta` tensors at SDXL shapes
(10 levels, hidden 256, batch 5) for `mixes` random per-level count mixes (1..16 heads per level, plus the
all-1 and all-16 mixes), with JITFunction.run replaced by a recorder that binds each launch with Triton's OWN
binder for an sm_90 target and computes the kernel-cache key exactly as JITFunction.run does. A key the
first mix did not produce is a recompilation on the GPU. Prints {"mixes", "keys_first", "keys_total",
"new_per_mix": [...], "kernels": {...}}. tests/test_heads_ops.py runs it in a subprocess (the test process has
the interpreter on).
"""
from __future__ import annotations

import json
import os
import random
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BACKEND = make_backend(GPUTarget("cuda", 90, 32))
_binders: dict = {}
_keys: set = set()


def _record(self, *args, grid, warmup, **kwargs):
    if self not in _binders:
        _binders[self] = create_function_from_signature(self.signature, self.params, _BACKEND)
    _, specialization, options = _binders[self](*args, **kwargs)
    _keys.add((self.fn.__name__, compute_cache_key({}, specialization, options)))


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


LEVELS = [(320, 128, 5)] * 3 + [(320, 64, 4), (640, 64, 4), (640, 64, 4), (640, 32, 3)] + [(1280, 32, 3)] * 3


def run_mix(counts, dtype=torch.bfloat16, batch=5, hidden=256, pool=16, k=4):
    import nitrokernels.kernels.heads as kernels

    features = [_meta(batch, c, s, s, dtype=dtype) for c, s, _ in LEVELS]
    lists = [[], [], [], [], [], []]
    for c, _, depth in LEVELS:
        c_in = c
        for i in range(4):
            lists[i].append([])
        for _ in range(depth):
            # HeadPool's storage: [P, 4, 4, I, O] seen as [P, O, I, 4, 4]
            lists[0][-1].append(_meta(pool, 4, 4, c_in, hidden, dtype=dtype).permute(0, 4, 3, 1, 2))
            for i in (1, 2, 3):
                lists[i][-1].append(_meta(pool, hidden, dtype=dtype))
            c_in = hidden
        lists[4].append(_meta(pool, 1, hidden, k, k, dtype=dtype))
        lists[5].append(_meta(pool, 1, dtype=dtype))
    ids = _meta(sum(counts), dtype=torch.long)
    offsets = [pool * lv for lv in range(len(LEVELS))]
    out, ys, stats, affine = kernels.levels_forward(features, *lists, ids, counts, offsets, 32, 1e-5)
    kernels.levels_backward(torch.empty_like(out), features, *lists, ids, counts, offsets, ys, stats, affine, 32,
                            1e-5, [True] * len(LEVELS), True)


def main(argv):
    n = int(argv[0]) if argv else 8
    rng = random.Random(0)
    mixes = [[1] * 10, [16] * 10] + [[rng.randint(1, 16) for _ in LEVELS] for _ in range(n)]
    JITFunction.run = _record
    new_per_mix, first = [], None
    for counts in mixes:
        before = set(_keys)
        run_mix(counts)
        new_per_mix.append(len(_keys - before))
        if first is None:
            first = len(_keys)
    kernels: dict = {}
    for name, _ in _keys:
        kernels[name] = kernels.get(name, 0) + 1
    print(json.dumps({"mixes": mixes, "keys_first": first, "keys_total": len(_keys), "new_per_mix": new_per_mix,
                      "kernels": kernels}))


if __name__ == "__main__":
    main(sys.argv[1:])
