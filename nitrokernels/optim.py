"""Optimisers for pooled parameters (one row per head along dim 0) that receive sparse gradients.

    pool = nitrokernels.nn.HeadPool(...)
    opt = nitrokernels.optim.SampledAdamW(pool.parameters(), lr=1e-4)
    ids = pool.sample(2); loss = pool(features, ids).sum(); loss.backward(); opt.step(); opt.zero_grad()

`clip_grad_norm_` is torch.nn.utils.clip_grad_norm_ for parameter lists that mix dense and sparse gradients
(torch's raises on sparse ones): the norm of a sparse gradient is that of its coalesced values (repeated rows
summed first), and clipping scales its values in place.

`SampledAdamW` is torch.optim.AdamW restricted to the rows that received a gradient:

  * gradients may be sparse COO with sparse_dim 1 (what `nitrokernels.ops.head_stack` returns for pooled
    parameters: indices = head rows, repeated rows are summed) or dense (every row counts as updated);
  * only those rows are read and written: their weight decay (decoupled, as AdamW), moments and step;
    every other row keeps bit-identical weights and optimiser state;
  * each row has its own step counter (state["step"] is a float32 [P] tensor), so the bias correction of a
    head that was sampled k times is exactly AdamW's after k steps, however many steps the optimiser took;
  * `reset_rows(param, rows)` zeroes the moments and step of those rows (what `HeadPool.refresh_` calls);
  * the state is kept in float32 whatever the parameter's dtype (float64 for float64 parameters): moments
    state["exp_avg"] / state["exp_avg_sq"], and for bf16/fp16 parameters fp32 master rows state["master"]
    (the parameter is their rounding). bf16 storage alone loses small updates: at lr 1e-5 an update of a
    weight |w| ~ 0.007 is below half its bf16 ulp and rounds away every step. A parameter element changed
    behind the optimiser's back (e.g. a re-initialised head) is re-read from the parameter at its next step;
  * state_dict() / load_state_dict() round-trip the fp32 state exactly (torch's default would cast it to the
    parameter's dtype); a state dict of the earlier 16-bit-state form loads too (moments upcast, masters
    taken from the parameters).

With every row present in every step it computes exactly what torch.optim.AdamW computes. The update runs
through `nitrokernels.ops.optim.sampled_adamw_`: one CUDA C++ multi-tensor launch by row index when the
extension is built (no host sync), else the eager index-based reference.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch

from nitrokernels.ops.optim import check_hyperparameters, needs_master, sampled_adamw_, state_dtype

__all__ = ["SampledAdamW", "clip_grad_norm_"]


class SampledAdamW(torch.optim.Optimizer):
    """AdamW that updates only the rows (dim 0) of each parameter present in its (sparse) gradient.

    Args: as torch.optim.AdamW (params, lr, betas, eps, weight_decay); amsgrad, maximize, foreach,
    capturable and fused are not offered. Hyperparameters must be finite real numbers (lr, eps, weight_decay
    >= 0, betas in [0, 1)). check_rows: verify the row indices of sparse gradients on the GPU too (one host
    sync per step; CPU gradients are always checked): an out-of-range row raises a ValueError.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, check_rows: bool = True):
        if isinstance(lr, torch.Tensor):
            raise TypeError(f"SampledAdamW: lr must be a float, not a tensor (got {lr!r})")
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"SampledAdamW: invalid betas {betas!r} (two values in [0, 1))")
        check_hyperparameters("SampledAdamW", lr, betas[0], betas[1], eps, weight_decay)
        self.check_rows = bool(check_rows)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # ------------------------------------------------------------------------------------------ state
    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            if p.dim() == 0:
                raise ValueError("SampledAdamW: 0-dim parameters have no rows; use torch.optim.AdamW for them")
            state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            sdt = state_dtype(p.dtype)
            state["exp_avg"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.contiguous_format)
        if state["step"].device != p.device:  # e.g. after load_state_dict, which keeps "step" where it was
            state["step"] = state["step"].to(p.device)
        if needs_master(p.dtype) and "master" not in state:
            state["master"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format).clone()
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One AdamW update of every parameter with a gradient (sparse rows: only those rows and their moments);
        `closure` re-evaluates the loss, as in torch.optim. Returns the closure's loss (None without one)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps, masters = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                masters.append(state.get("master"))
            beta1, beta2 = group["betas"]
            sampled_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr=group["lr"], beta1=beta1,
                           beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                           check_rows=getattr(self, "check_rows", True))
        return loss

    @torch.no_grad()
    def reset_rows(self, param: torch.Tensor, rows) -> None:
        """Zero the moments and the step counter of `rows` (indices along dim 0) of `param`; fp32 master rows
        (16-bit params) are re-read from the parameter (re-initialised rows start from their new values).

        `rows`: int, sequence of ints or an integer tensor (any device; it is moved, no host sync). Rows of
        a parameter that has no state yet need nothing. Raises ValueError if `param` is not optimised here.
        """
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("SampledAdamW.reset_rows: this parameter is not in the optimiser's param groups")
        state = self.state.get(param)
        if not state:
            return
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if rows.device.type == "cpu" and rows.numel() and (rows.min() < 0 or rows.max() >= param.shape[0]):
            raise IndexError(f"SampledAdamW.reset_rows: rows must be in [0, {param.shape[0]}), got {rows.tolist()}")
        rows = rows.to(param.device, non_blocking=True)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state[key].index_fill_(0, rows.to(state[key].device, non_blocking=True), 0)
        if "master" in state:
            state["master"].index_copy_(0, rows, param.detach().index_select(0, rows).to(torch.float32))

    # ------------------------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that the float32 moments / masters keep their dtype (torch would cast them to
        the parameter's dtype); older 16-bit moments are upcast, missing masters come from the parameters."""
        kept_keys = ("exp_avg", "exp_avg_sq", "master")
        saved = state_dict["state"]
        kept = {k: {n: v for n, v in s.items() if n in kept_keys} for k, s in saved.items()}
        stripped = dict(state_dict)
        stripped["state"] = {k: {n: v for n, v in s.items() if n not in kept_keys} for k, s in saved.items()}
        super().load_state_dict(stripped)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for name, value in kept.get(i, {}).items():
                self.state[p][name] = value.to(device=p.device, dtype=state_dtype(p.dtype)
                                               if name != "master" else torch.float32,
                                               memory_format=torch.contiguous_format).clone()
            if i in kept:
                self._state_of(p)


def _grad_values(g: torch.Tensor) -> torch.Tensor:
    """The elements whose norm is the gradient's: a sparse gradient's coalesced values (repeated rows summed)."""
    return g.coalesce()._values() if g.is_sparse else g


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the gradients of `parameters` (dense or sparse COO) to a total `norm_type` norm of at most `max_norm`,
    in place, as torch.nn.utils.clip_grad_norm_; returns the total norm before clipping (a 0-d tensor)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value <= 0:
            raise ValueError(f"clip_grad_norm_: {name} must be a number > 0, got {value!r}")
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    norms = [torch.linalg.vector_norm(_grad_values(g).detach().float(), norm_type) for g in grads]
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} is {total.item()}: non-finite")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        target = g._values() if g.is_sparse else g     # scaling is linear: uncoalesced values scale alike
        target.mul_(coef.to(device=target.device, dtype=target.dtype))
    return total
