"""Pure-Python facts the kernels and the ops both need; importing this module needs neither Triton nor torch.

The eager (Triton-free) heads path orders levels with `level_order` too, so it must not live in a module that
imports Triton (macOS / Windows installs have none)."""
from __future__ import annotations

import os


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU (TRITON_INTERPRET=1; read when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def level_order(counts, depths) -> tuple[list[int], dict[int, int]]:
    """The levels that have sampled heads, deepest first (stable), and each one's first "sorted head" index.

    With this order the heads that take part in layer depth d (levels deeper than d) are a prefix, so
    per-depth buffers are [H_d, ...] and a head keeps its index at every depth (see kernels/heads.py)."""
    order = sorted((l for l in range(len(counts)) if counts[l] > 0), key=lambda l: -depths[l])
    first, n = {}, 0
    for l in order:
        first[l] = n
        n += counts[l]
    return order, first
