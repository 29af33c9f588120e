"""Attention and GEGLU at SDXL sizes (issue 4): our Triton kernels vs PyTorch, same run, bf16.

Run: `pytest benchmarks/bench_attention.py --benchmark-only` on a GPU (skipped without one).

Attention (B=2, head dim 64, q/k/v as the attention processor makes them: transposed views of [B, L, H*D]):
  self 4096 tokens x 10 heads, self 1024 x 20, cross 4096 x 10 with 77 keys, cross 1024 x 20 with 77 keys;
  forward, and forward+backward (gradients of q, k, v). Variants:
    fused           nitrokernels.ops.attention with the Triton backend forced
    sdpa            F.scaled_dot_product_attention, PyTorch's own choice (flash / cuDNN / efficient)
    sdpa_flash, sdpa_efficient, sdpa_cudnn   SDPA restricted to one kernel (when it runs these inputs)
    eager_math      SDPA's math backend (materialised scores: what plain PyTorch code does)
  Floor: matmul FLOPs (4*B*H*Lq*Lk*D forward; x3.5 for forward+backward, i.e. the 5 backward matmuls of
  FlashAttention-2 -- our backward recomputes two more, the floor does not count them) at the measured bf16
  matmul rate.

GEGLU (diffusers FeedForward input layer; SDXL dims 640 -> 2x2560 and 1280 -> 2x5120):
  x [2, 4096, 640] and [2, 1024, 1280] (training batch), and [1, 4096, 640] / [1, 1024, 1280] forward only
  (one-step inference at batch 1). Variants: fused (Triton GEMM + epilogue), eager (F.linear + chunk + gelu *
  multiply, what diffusers runs), compiled (torch.compile of the eager code, default mode; left out with
  NITROKERNELS_BENCH_COMPILE=0). Floor: the GEMM
  FLOPs (x3 for forward+backward) or the bytes of x, W and the output, whichever is larger.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import compile_baselines
from nitrokernels.kernels.attention import attention_flops
from nitrokernels.ops.attention import attention
from nitrokernels.ops.dispatch import use_backend
from nitrokernels.ops.geglu import _geglu_eager, geglu

DTYPE = torch.bfloat16

ATTENTION_CASES = {  # name: (B, heads, Lq, Lk, D)
    "self-4096x10": (2, 10, 4096, 4096, 64),
    "self-1024x20": (2, 20, 1024, 1024, 64),
    "cross-4096x10-77": (2, 10, 4096, 77, 64),
    "cross-1024x20-77": (2, 20, 1024, 77, 64),
}


def _sdpa_variants():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def restricted(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    variants = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                "sdpa_flash": restricted(SDPBackend.FLASH_ATTENTION),
                "sdpa_efficient": restricted(SDPBackend.EFFICIENT_ATTENTION),
                "eager_math": restricted(SDPBackend.MATH)}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        variants["sdpa_cudnn"] = restricted(SDPBackend.CUDNN_ATTENTION)
    return variants


def _fused(q, k, v):
    with use_backend("triton", "attention"):
        return attention(q, k, v)


def _qkv(b, h, lq, lk, d, requires_grad):
    def make(length):
        return torch.randn(b, length, h, d, device="cuda", dtype=DTYPE).transpose(1, 2).requires_grad_(requires_grad)
    return make(lq), make(lk), make(lk)


def _runnable(fn, *args) -> str | None:
    try:
        fn(*args)
        torch.cuda.synchronize()
        return None
    except RuntimeError as err:  # a restricted SDPA backend that does not take these inputs
        return str(err).splitlines()[0][:160]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention(nk_bench, name, backward):
    b, h, lq, lk, d = ATTENTION_CASES[name]
    torch.manual_seed(0)
    q, k, v = _qkv(b, h, lq, lk, d, backward)
    grad = torch.randn(b, lq, h, d, device="cuda", dtype=DTYPE).transpose(1, 2)
    impls = {"fused": _fused, **_sdpa_variants()}
    variants, skipped = {}, []
    for key, fn in impls.items():
        if backward:
            call = (lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), grad))
        else:
            call = (lambda fn=fn: fn(q, k, v))
        problem = _runnable(call)
        if problem is None:
            variants[key] = call
        else:
            skipped.append(f"{key}: {problem}")
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        err = (_fused(q, k, v).float() - ref).abs().max().item()
    nk_bench.compare(f"attention/{name}/{'fwd+bwd' if backward else 'fwd'}",
                     {"B": b, "heads": h, "Lq": lq, "Lk": lk, "head_dim": d, "dtype": "bf16", "backward": backward},
                     variants, flops=attention_flops(b, h, lq, lk, d, backward=backward), dtype=DTYPE,
                     memory=backward,
                     notes=f"max |fused - fp32 SDPA| = {err:.3g}" + ("; skipped " + "; ".join(skipped) if skipped else ""))


GEGLU_CASES = {  # name: (B, tokens, dim_in, dim_out, backward)
    "640-b2": (2, 4096, 640, 2560, True),
    "1280-b2": (2, 1024, 1280, 5120, True),
    "640-b1": (1, 4096, 640, 2560, False),
    "1280-b1": (1, 1024, 1280, 5120, False),
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(GEGLU_CASES))
def test_geglu(nk_bench, name, backward):
    b, tokens, k, n, train = GEGLU_CASES[name]
    if backward and not train:
        pytest.skip("batch-1 cases are inference (forward only)")
    torch.manual_seed(0)
    x = torch.randn(b, tokens, k, device="cuda", dtype=DTYPE, requires_grad=backward)
    w = (torch.randn(2 * n, k, device="cuda", dtype=DTYPE) * k ** -0.5).requires_grad_(backward)
    bias = (torch.randn(2 * n, device="cuda", dtype=DTYPE) * 0.1).requires_grad_(backward)
    grad = torch.randn(b, tokens, n, device="cuda", dtype=DTYPE)

    def fused(x, w, bias):
        with use_backend("triton", "geglu"):
            return geglu(x, w, bias)

    impls = {"fused": fused, "eager": _geglu_eager}
    if compile_baselines():
        impls["compiled"] = torch.compile(_geglu_eager)
    variants = {}
    for key, fn in impls.items():
        if backward:
            variants[key] = lambda fn=fn: torch.autograd.grad(fn(x, w, bias), (x, w, bias), grad)
        else:
            variants[key] = lambda fn=fn: fn(x, w, bias)
    m = b * tokens
    flops = 2.0 * m * k * 2 * n * (3 if backward else 1)
    bytes_moved = 2.0 * (m * k + 2 * n * k + m * n)
    with torch.no_grad():
        ref = _geglu_eager(x.float(), w.float(), bias.float())
        err = (fused(x, w, bias).float() - ref).abs().max().item()
        eager_err = (_geglu_eager(x, w, bias).float() - ref).abs().max().item()
    nk_bench.compare(f"geglu/{name}/{'fwd+bwd' if backward else 'fwd'}",
                     {"B": b, "tokens": tokens, "dim_in": k, "dim_out": n, "dtype": "bf16", "backward": backward},
                     variants, flops=flops, bytes_moved=0.0 if backward else bytes_moved, dtype=DTYPE,
                     memory=backward,
                     notes=f"max error vs fp32: fused {err:.3g}, eager bf16 {eager_err:.3g}")
