"""CUDA-graph inference: capture a module's forward once per input signature, then replay it.

    g = nitrokernels.graphed(unet, sample=x, timestep=t, encoder_hidden_states=c)   # captures now
    out = g(sample=x2, timestep=t2, encoder_hidden_states=c2)                        # copy in, replay, clone out

What it does
  * Inputs (positional and keyword, nested lists / tuples / dicts such as SDXL's `added_cond_kwargs`) are
    flattened; every tensor is copied into a static buffer of the same shape, dtype and strides, and the
    graph captured on those buffers is replayed (`torch.no_grad()`: inference only).
  * The signature of a call -- the argument structure, each tensor's shape / dtype / device / strides, every
    non-tensor argument's value (it was baked into the graph), and `module.training` -- selects the graph.
    A new signature captures a new graph; the last `max_graphs` are kept (least recently used evicted).
    Pass values that change between calls (e.g. a UNet's timestep) as CUDA tensors: a Python number is a
    constant of the graph (each value captures another one), and diffusers turns an int timestep into a CUDA
    tensor inside the forward, a host-to-device copy that cannot be captured.
  * Before capture the forward runs `warmup` times on a side stream (as torch's CUDA-graph docs require;
    this is also where Triton kernels compile and autotune), then once more under capture.
  * All graphs of one GraphedModule share one memory pool, which is safe because they are replayed one at a
    time on the caller's stream.

What it refuses (with an error that says why)
  * CPU (or any non-CUDA) module parameters / buffers or input tensors, and modules spanning several GPUs.
  * Grad-mode use that would silently drop gradients: `torch.is_grad_enabled()` together with
    `module.training` or with an input that requires grad (replays never build an autograd graph).
  * Calling it while another CUDA graph is being captured, and unhashable non-tensor arguments.
  * Replays after the module's parameters or buffers moved to new memory (`module.to(...)`, `.half()`):
    the graph would read the old storage. Call `.reset()` to drop the graphs and capture again.
    Assigning new Parameter objects is not detected. In-place updates (optimizer steps, `load_state_dict`)
    write the captured storage, so replays see them -- except through tensors the forward derived from the
    weights and cached, such as a patched model's fused QKV weights (NitroAttnProcessor, inference): after
    changing the weights of a patched model, call `.reset()`.

Outputs: with `clone_outputs=True` (default) every call returns fresh tensors. With `clone_outputs=False` it
returns the graph's static output buffers themselves (no copy, fastest): they are overwritten by the next
call of this GraphedModule (any signature), so clone what you keep.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

log = logging.getLogger("nitrokernels")

__all__ = ["GraphedModule", "graphed"]


class _Captured:
    """One captured graph: its static input leaves, its static output tree, the graph itself."""

    __slots__ = ("graph", "static_inputs", "static_output")

    def __init__(self, graph, static_inputs, static_output):
        self.graph = graph
        self.static_inputs = static_inputs  # list aligned with the flattened inputs: Tensor or None (constant)
        self.static_output = static_output


def _leaf_key(value: Any):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    return ("const", type(value), value)  # hashed by the cache lookup (unhashable values are refused there)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _leaf_name(args, kwargs, index: int) -> str:
    """Readable name of the index-th flattened argument leaf (for error messages only)."""
    path = pytree.tree_flatten_with_path((args, kwargs))[0][index][0]
    if path[0].idx == 0:
        return f"positional argument {path[1].idx}" + pytree.keystr(path[2:])
    return f"argument {path[1].key!r}" + pytree.keystr(path[2:])


class GraphedModule:
    """Callable wrapper that replays CUDA graphs of `module`'s forward; see the module docstring."""

    def __init__(self, module: nn.Module, *, clone_outputs: bool = True, warmup: int = 3, max_graphs: int = 8):
        if not isinstance(module, nn.Module):
            raise TypeError(f"graphed: expected an nn.Module, got {type(module).__name__}")
        if max_graphs < 1:
            raise ValueError("graphed: max_graphs must be at least 1")
        self.module = module
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: collections.OrderedDict[Any, _Captured] = collections.OrderedDict()
        self._pool = None
        self._state = self._module_state()
        self.captures = 0  # how many graphs were captured in total (tests / diagnostics)

    # ------------------------------------------------------------------------------------ module state
    def _module_state(self):
        no_gpu = "" if torch.cuda.is_available() else " (torch.cuda.is_available() is False here)"
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        devices = {t.device for t in tensors}
        not_cuda = sorted(str(d) for d in devices if d.type != "cuda")
        if not_cuda:
            raise RuntimeError(f"graphed: CUDA graphs need the module on a CUDA device, but {type(self.module).__name__} "
                               f"has parameters/buffers on {not_cuda}{no_gpu}; call it directly or .to('cuda') it")
        if no_gpu:
            raise RuntimeError(f"graphed: CUDA graphs need a CUDA GPU{no_gpu}")
        if len(devices) > 1:
            raise RuntimeError(f"graphed: the module spans several devices {sorted(map(str, devices))}; "
                               f"a CUDA graph is captured on one device")
        self._tensors = tensors
        self._device = next(iter(devices)) if devices else None
        return self._storage_snapshot()

    def _storage_snapshot(self):
        return tuple(t.data_ptr() for t in self._tensors)

    def reset(self):
        """Drop every captured graph (and re-read the module's parameters); the next call captures again."""
        self._graphs.clear()
        self._pool = None
        self._state = self._module_state()

    @property
    def num_graphs(self) -> int:
        """How many CUDA graphs have been captured (one per input signature)."""
        return len(self._graphs)

    # ------------------------------------------------------------------------------------------ checks
    def _check_call(self, args, kwargs, leaves):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("graphed: called while a CUDA graph is being captured; nested capture is not supported")
        grad = torch.is_grad_enabled()
        if grad and self.module.training:
            raise RuntimeError("graphed: the module is in training mode with grad enabled, but a graphed forward is "
                               "inference only (no autograd graph is recorded). Call module.eval() and/or run "
                               "under torch.no_grad() / torch.inference_mode().")
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                continue
            problem = None
            if leaf.device.type != "cuda":
                problem = f"is on {leaf.device}; CUDA graphs need CUDA tensors"
            elif self._device is not None and leaf.device != self._device:
                problem = f"is on {leaf.device} but the module is on {self._device}"
            elif grad and leaf.requires_grad:
                problem = ("requires grad, but a graphed forward records no autograd graph; run under "
                           "torch.no_grad() or detach it")
            if problem:
                raise RuntimeError(f"graphed: {_leaf_name(args, kwargs, i)} {problem}")
        if self._storage_snapshot() != self._state:
            if not self._graphs:  # nothing captured yet: just take the module as it is now
                self._state = self._module_state()
                return
            raise RuntimeError("graphed: the module's parameters or buffers moved to new memory since capture "
                               "(module.to(...), .half(), ...); the graphs would read the old storage. Call "
                               ".reset() on the GraphedModule to capture again.")

    # ----------------------------------------------------------------------------------------- capture
    def _capture(self, leaves, spec) -> _Captured:
        static_inputs = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                buf = torch.empty_like(leaf, memory_format=torch.preserve_format)
                buf.copy_(leaf)
                static_inputs.append(buf)
            else:
                static_inputs.append(None)
        static_args, static_kwargs = pytree.tree_unflatten(
            [b if b is not None else v for b, v in zip(static_inputs, leaves)], spec)
        device = self._device or next((t.device for t in static_inputs if t is not None), None)
        if device is None:
            raise RuntimeError("graphed: neither the module nor the inputs hold a CUDA tensor; nothing to capture on")
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.module(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    static_output = self.module(*static_args, **static_kwargs)
            except RuntimeError as err:
                raise RuntimeError(
                    f"graphed: capturing {type(self.module).__name__}'s forward in a CUDA graph failed: {err}\n"
                    "The forward must not synchronise with the host during capture: no .item() / .cpu() / "
                    "printing of CUDA values, no CUDA tensors built from Python numbers (pass e.g. a UNet's "
                    "timestep as a CUDA tensor, not an int), no data-dependent shapes.") from err
        self.captures += 1
        return _Captured(graph, static_inputs, static_output)

    # -------------------------------------------------------------------------------------------- call
    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        self._check_call(args, kwargs, leaves)
        key = (spec, self.module.training, tuple(_leaf_key(v) for v in leaves))
        try:
            hash(key)
        except TypeError:
            bad = next(i for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor) and not _hashable(v))
            raise TypeError(f"graphed: {_leaf_name(args, kwargs, bad)} ({type(leaves[bad]).__name__}) is not "
                            f"hashable; non-tensor arguments are baked into the captured graph as constants and "
                            f"must be hashable") from None
        entry = self._graphs.get(key)
        if entry is None:
            if self._graphs:
                log.info("graphed(%s): new input signature, capturing graph %d", type(self.module).__name__,
                         len(self._graphs) + 1)
            entry = self._capture(leaves, spec)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
                log.info("graphed(%s): more than %d signatures, evicted the least recently used graph",
                         type(self.module).__name__, self.max_graphs)
        else:
            self._graphs.move_to_end(key)
            for buf, leaf in zip(entry.static_inputs, leaves):
                if buf is not None:
                    buf.copy_(leaf)
        entry.graph.replay()
        if not self.clone_outputs:
            return entry.static_output
        return pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), entry.static_output)

    def __repr__(self):
        return (f"GraphedModule({type(self.module).__name__}, graphs={len(self._graphs)}, "
                f"clone_outputs={self.clone_outputs})")


def graphed(module: nn.Module, *example_args, clone_outputs: bool = True, warmup: int = 3, max_graphs: int = 8,
            **example_kwargs) -> GraphedModule:
    """Wrap `module` so calls replay CUDA graphs of its forward (inference; see this module's docstring).

    Example arguments, when given, are captured right away (so the first real call only replays); without
    them the first call captures. `clone_outputs=False` returns the static output buffers (overwritten by the
    next call). `warmup` forward runs on a side stream precede each capture; `max_graphs` signatures are kept.
    """
    g = GraphedModule(module, clone_outputs=clone_outputs, warmup=warmup, max_graphs=max_graphs)
    if example_args or example_kwargs:
        g(*example_args, **example_kwargs)
    return g
