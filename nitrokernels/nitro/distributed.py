"""NitroDistiller on 1 to N processes with torch.distributed (NCCL on GPUs, gloo on the CPU).

    torchrun --nproc_per_node=2 -m nitrokernels distill --preset digits --out runs/x --steps 20

What is shared, what is per rank (DistributedNitroDistiller):
  * every rank seeds the distiller's two generators (host + device) with the same run seed, so every rank draws
    the same t* groups, head ids, schedule steps (backward simulation) and refreshes the same heads;
  * the data each rank sees comes from those generators too, but as rows of a *global* batch: each micro-batch
    draws world_size x batch_size prompts and noise (and the backward-simulation and re-noising noise) and rank r
    keeps rows [r*batch_size, (r+1)*batch_size). A rank's stream is thus a function of the run seed and its rank
    only (reproducible), and a run on N ranks of batch B is the same computation as a run on 1 rank of batch N*B
    (tests/test_distributed.py checks this within fp32 tolerance). The price is drawing N*B noise samples on every
    rank, negligible against a UNet call;
  * the student is data-parallel: its grad-enabled forwards go through torch's DistributedDataParallel (which
    all-reduces the gradients in buckets during backward; gradient_as_bucket_view, so no second copy of the
    gradients; find_unused_parameters=True because a UNet config can hold parameters a forward does not use);
    with grad_accum micro-batches only the last backward all-reduces (DDP's no_sync for the others), checked
    before every student optimiser step;
  * or, with `fsdp=True` (`distill --fsdp`), the student is sharded with FSDP2 (`fully_shard`, see shard_unet):
    each rank holds 1/N of its parameters, gradients and AdamW states; forwards all-gather a block's parameters,
    backwards reduce-scatter its gradients (only the last of grad_accum micro-batches synchronises:
    set_requires_gradient_sync). The EMA copy is sharded the same way. Every forward of a sharded student is a
    collective, so every rank runs the sample grids; checkpoints gather the full student, EMA and optimiser
    states (torch.distributed.checkpoint's full state dicts) and rank 0 writes them in the same format as a DDP or
    one-process run (optimiser states keyed by parameter index), so a checkpoint does not depend on the sharding;
    resuming distributes them back (set_model_state_dict / set_optimizer_state_dict). Not with LoRA students
    (`trainable`): their few trained parameters gain nothing from sharding; use DDP;
  * the heads' gradients are sparse COO tensors of the sampled rows only: before each heads optimiser step their
    coalesced values (all sampled rows of all pools) are averaged in ONE all-reduce of one flat buffer per dtype;
    the pool never goes dense on the wire (`heads_allreduce_numel` records what was sent);
  * the logged losses and diagnostics are averaged over the ranks (one small all-reduce per iteration);
  * rank 0 alone writes log.jsonl, the sample grids and the (atomic) checkpoint, plus `distributed.json` with the
    world size; a resume needs the same world size (refused otherwise) and continues exactly.
Not supported with world_size > 1: mixed_precision="fp16" (the GradScaler's inf check would run per rank before
the heads' all-reduce; use bf16). A teacher scheduler that draws noise in `step` (ancestral / LCM samplers) gets
the shared generator with a per-rank batch: its noise is then the same on every rank (DDIM/Euler draw none).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nitrokernels.nitro.distiller import CheckpointError, NitroDistiller, _map, _MicroBatch

__all__ = ["DistContext", "init_distributed", "allreduce_sparse_grads_", "DistributedNitroDistiller",
           "shard_unet", "WORLD_FILE"]

WORLD_FILE = "distributed.json"


@dataclass
class DistContext:
    """Where this process stands: rank, world size, local rank (the GPU index under torchrun), backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()

    def device(self, requested: str | None = None) -> torch.device:
        """This rank's device: cuda:<local_rank> on several processes with CUDA, else `requested` (default: cuda
        when available, else the CPU)."""
        if requested is not None:
            dev = torch.device(requested)
            return torch.device("cuda", self.local_rank) if dev.type == "cuda" and self.distributed else dev
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed(backend: str | None = None) -> DistContext:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment)
    or the one already initialised; a plain process is rank 0 of 1 (no process group). Backend: NCCL when CUDA is
    available, else gloo."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                           dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend)


@torch.no_grad()
def allreduce_sparse_grads_(params, world_size: int, group=None, check_indices: bool = False) -> int:
    """Average the gradients of `params` over the ranks in place, sending only the values of sparse COO gradients
    (their coalesced rows): one flat buffer per dtype, one all-reduce each. Every rank must hold gradients of the
    same rows (the same sampled heads), which `check_indices` verifies with one more small all-reduce. Dense
    gradients (a backend without sparse gradients) are averaged whole, in the same buffer. Returns the number of
    elements all-reduced."""
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()
            grads.append((p, g, g._values()))
        else:
            grads.append((p, None, g))
    if not grads or world_size <= 1:
        return 0
    if check_indices:
        sig = torch.tensor([[float(i), float(s._indices().numel()), float(s._indices().sum()) if s is not None else -1.0]
                            for i, (_, s, _) in enumerate(grads) if s is not None] or [[0.0, 0.0, 0.0]],
                           dtype=torch.float64, device=grads[0][2].device)
        lo, hi = sig.clone(), sig.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(lo, hi):
            raise RuntimeError("allreduce_sparse_grads_: the ranks hold gradients of different head rows (the head "
                               "ids must come from the shared generator)")
    sent = 0
    by_dtype: dict = {}
    for item in grads:
        by_dtype.setdefault(item[2].dtype, []).append(item)
    for items in by_dtype.values():
        flat = torch.cat([v.reshape(-1) for _, _, v in items])
        dist.all_reduce(flat, group=group)
        flat.div_(world_size)
        sent += flat.numel()
        offset = 0
        for p, s, v in items:
            n = v.numel()
            new = flat[offset:offset + n].view_as(v)
            offset += n
            if s is None:
                p.grad.copy_(new)
            else:
                p.grad = torch.sparse_coo_tensor(s._indices(), new, s.shape, is_coalesced=True,
                                                 check_invariants=False)
    return sent


def shard_unet(unet: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 plan for a diffusers UNet (in place): each down block, the mid block and each up block is one
    fully_shard unit (all-gathered for its forward, resharded after), the root holds the rest (conv_in, time and
    class embeddings, conv_norm_out / conv_out). Every parameter becomes a DTensor sharded on dim 0 over `mesh`."""
    from torch.distributed.fsdp import fully_shard

    blocks = [*getattr(unet, "down_blocks", ()), getattr(unet, "mid_block", None), *getattr(unet, "up_blocks", ())]
    for block in blocks:
        if block is not None and any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


class DistributedNitroDistiller(NitroDistiller):
    """NitroDistiller across the ranks of `ctx` (see the module docstring). `config.batch_size` is per rank; with
    ctx.world_size == 1 this is a plain NitroDistiller (same draws, same results)."""

    def __init__(self, *args, ctx: DistContext | None = None, check_indices: bool = False,
                 find_unused_parameters: bool = True, trainable=None, fsdp: bool = False, **kwargs):
        self.ctx = ctx or DistContext()
        config = args[4] if len(args) > 4 else kwargs["config"]
        if self.ctx.distributed and config.mixed_precision == "fp16":
            raise ValueError("DistillConfig.mixed_precision='fp16' is not supported on several processes (the "
                             "GradScaler's per-rank inf check would let the ranks diverge); use 'bf16'")
        if fsdp and trainable is not None:
            raise ValueError("DistributedNitroDistiller: fsdp=True shards a fully trained student; a LoRA student "
                             "(`trainable`) trains few parameters and gains nothing from it: use fsdp=False (DDP)")
        # one process has nothing to shard over: fsdp is then the plain distiller
        self.fsdp = bool(fsdp) and self.ctx.distributed
        self._full_states = None   # the gathered full student states while a checkpoint is written (fsdp)
        self._sync_now = True      # whether the student's last grad-enabled forward will synchronise (fsdp)
        if not self.ctx.is_main:
            config.progress = False
        super().__init__(*args, **kwargs)
        if trainable is not None:
            self._train_only(trainable)
        self.check_indices = check_indices
        self.heads_allreduce_numel: list[int] = []
        self._ddp = None
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # the heads were initialised from the same seed on every rank; make sure of it bit for bit
            with torch.no_grad():
                for p in self.disc.head_parameters():
                    dist.broadcast(p.data, 0)
            import inspect

            if self.fsdp:
                self._shard_student()
            else:
                devices = [self.device.index] if self.device.type == "cuda" else None
                # the UNet's buffers are constants: no per-forward buffer broadcast (the keyword's newer name first)
                sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
                    inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False}
                self._ddp = DistributedDataParallel(self.student, device_ids=devices,
                                                    find_unused_parameters=find_unused_parameters,
                                                    gradient_as_bucket_view=True, **sync)  # no 2nd gradient copy
            self.opt_heads.register_step_pre_hook(self._sync_heads)
            self.opt_student.register_step_pre_hook(self._check_student_synced)
            self.disc.renoise = self._renoise
        self._grad_forwards = 0

    def _train_only(self, trainable) -> None:
        """Train only the student parameters whose name satisfies `trainable(name)` (e.g. LoRA adapters): the
        others are frozen and the student's AdamW (and its LR schedule) is rebuilt over the trained ones."""
        params = []
        for name, p in self.student.named_parameters():
            p.requires_grad_(bool(trainable(name)))
            if p.requires_grad:
                params.append(p)
        if not params:
            raise ValueError("DistributedNitroDistiller: `trainable` selects no student parameter")
        self._rebuild_student_optimizer(params)

    def _rebuild_student_optimizer(self, params) -> None:
        """A fresh student AdamW (and LR schedule) over `params` (before any step: nothing is lost)."""
        cfg = self.config
        self.opt_student = torch.optim.AdamW(params, lr=cfg.lr_student, betas=cfg.betas_student,
                                             weight_decay=cfg.weight_decay_student)
        self.sched_student = torch.optim.lr_scheduler.LambdaLR(self.opt_student, self.sched_heads.lr_lambdas[0])

    def _shard_student(self) -> None:
        """FSDP2: rank 0's student (and EMA) on every rank, then sharded (shard_unet); the optimiser is rebuilt
        over the sharded parameters (fully_shard replaces them by DTensors)."""
        from torch.distributed.device_mesh import init_device_mesh

        with torch.no_grad():
            for module in (self.student, self.ema):
                for p in [] if module is None else module.parameters():
                    dist.broadcast(p.data, 0)
        mesh = init_device_mesh(self.device.type, (self.ctx.world_size,))
        shard_unet(self.student, mesh)
        if self.ema is not None:
            shard_unet(self.ema, mesh)
        self._rebuild_student_optimizer(list(self.student.parameters()))

    # ------------------------------------------------------------------------------- global-batch draws
    def _rows(self, batch: int) -> slice:
        return slice(self.ctx.rank * batch, (self.ctx.rank + 1) * batch)

    def _global_randn(self, shape, generator, device, dtype=None):
        """This rank's rows of a draw of the global batch (world_size x shape[0] rows) from `generator`."""
        shape = tuple(shape)
        full = torch.randn((shape[0] * self.ctx.world_size,) + shape[1:], generator=generator, device=device,
                           dtype=dtype)
        return full[self._rows(shape[0])]

    def _renoise(self, x0, t, generator=None):
        d = self.disc
        a = d.alphas_cumprod[t].to(x0.device)
        gen_device = generator.device if generator is not None else x0.device
        eps = self._global_randn(x0.shape, generator, gen_device, x0.dtype).to(x0.device)
        return a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * eps

    def _micro_batches(self):
        cfg = self.config
        batches = []
        rows = self._rows(cfg.batch_size)
        for _ in range(cfg.grad_accum):
            cond, uncond, idx = self.prompts(cfg.batch_size * self.ctx.world_size, self.host_gen, self.device)
            cond = _map(cond, lambda v: v[rows])
            uncond = None if uncond is None else _map(uncond, lambda v: v[rows])
            noise = self._global_randn(self._latent_shape(cfg.batch_size), self.dev_gen, self.device)
            steps, index = self._draw_step()
            x = self.simulate_input(noise, cond, steps, index)
            batches.append(_MicroBatch(noise, cond, uncond, steps, index, x))
        return batches

    @torch.no_grad()
    def simulate_input(self, noise, cond, steps, index):
        x = noise.float()
        sched = self.student_scheduler
        for i in range(index):
            denoised = self.student_denoise(x, cond, steps, i)
            a_next = float(sched.alphas_cumprod[int(sched.lcm_timesteps[i + 1])])
            z = self._global_randn(x.shape, self.dev_gen, self.device)
            x = a_next ** 0.5 * denoised + (1 - a_next) ** 0.5 * z
        return x

    # ------------------------------------------------------------------------------------ gradients
    def student_denoise(self, x, cond, steps, index, model=None):
        if model is None and (self._ddp is not None or self.fsdp) and torch.is_grad_enabled():
            # grad-enabled forwards go through DDP (or the FSDP2-sharded student); of the grad_accum micro-batches
            # of one student step only the last one's backward all-reduces / reduce-scatters (the others
            # accumulate locally, as DDP's no_sync does)
            accum = self.config.grad_accum
            self._sync_now = self._grad_forwards % accum == accum - 1
            if self.fsdp:
                self.student.set_requires_gradient_sync(self._sync_now)
            else:
                model = self._ddp
                model.require_backward_grad_sync = self._sync_now
            self._grad_forwards += 1
        return super().student_denoise(x, cond, steps, index, model)

    def _student_update(self, lr=None):
        grad_norm = super()._student_update(lr)
        # a sharded student's norm is a DTensor (its reduction over the ranks pending): a plain tensor for the log
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def _sync_heads(self, optimizer, args, kwargs):
        n = allreduce_sparse_grads_(list(self.disc.head_parameters()), self.ctx.world_size,
                                    check_indices=self.check_indices)
        self.heads_allreduce_numel.append(n)

    def _check_student_synced(self, optimizer, args, kwargs):
        """Before the student's AdamW step: its gradients were all-reduced (a multiple of grad_accum grad-enabled
        forwards, the last one synchronised); anything else would let the ranks' students drift apart."""
        if self._grad_forwards % self.config.grad_accum != 0 or not self._sync_now:
            raise RuntimeError(f"DistributedNitroDistiller: {self._grad_forwards} grad-enabled student forwards "
                               f"before its optimiser step, not a multiple of grad_accum={self.config.grad_accum}: "
                               f"the last backward did not all-reduce the gradients")
        self._grad_forwards = 0

    def train_step(self) -> dict:
        self._grad_forwards = 0
        result = super().train_step()
        if self.ctx.distributed:
            keys = [k for k in ("d_loss", "g_loss", "regression_loss") if k in result]
            diag = sorted(result.get("diagnostics", {}))
            values = [torch.as_tensor(result[k]).detach().float().reshape(()) for k in keys]
            values += [torch.as_tensor(result["diagnostics"][k]).detach().float().reshape(()) for k in diag]
            if values:
                flat = torch.stack(values).to(self.device)
                dist.all_reduce(flat)
                flat.div_(self.ctx.world_size)
                for i, k in enumerate(keys):
                    result[k] = flat[i]
                for j, k in enumerate(diag):
                    result["diagnostics"][k] = flat[len(keys) + j]
        return result

    # --------------------------------------------------------------------------------- rank-0 files
    def _flush_log(self, elapsed):
        if self.ctx.is_main:
            return super()._flush_log(elapsed)
        out_dir, self.config.out_dir = self.config.out_dir, None
        try:
            return super()._flush_log(elapsed)
        finally:
            self.config.out_dir = out_dir

    def save_samples(self, path=None):
        if not self.ctx.is_main:
            if self.fsdp and (path is not None or self.config.out_dir):
                self.sample_one_step(self._grid_noise, self._grid_idx)  # the sharded forward is a collective
            return None
        return super().save_samples(path)

    # ------------------------------------------------------------------------------- full states (fsdp)
    def full_student_state_dict(self, ema: bool = False) -> dict:
        """The student's (or its EMA's) full state dict on the CPU, for saving it unsharded. With fsdp a collective
        (call it on every rank; rank 0 gets the tensors, the others an empty dict); else the module's own."""
        module = self.ema if ema else self.student
        if module is None:
            raise ValueError("DistributedNitroDistiller.full_student_state_dict(ema=True): this run keeps no EMA")
        if not self.fsdp:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _student_states(self) -> dict:
        if not self.fsdp:
            return super()._student_states()
        if self._full_states is None:
            raise RuntimeError("DistributedNitroDistiller.state_dict() with fsdp: the sharded student's state is "
                               "gathered by save_checkpoint() (a collective of every rank); call that instead")
        return self._full_states

    def _gather_student_states(self) -> dict:
        """Every rank: the full student, EMA and optimiser states (rank 0 gets them), the optimiser's keyed by
        parameter index as a plain AdamW's state_dict() is, so the checkpoint does not depend on the sharding."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        student = self.full_student_state_dict()
        ema = None if self.ema is None else self.full_student_state_dict(ema=True)
        opt = get_optimizer_state_dict(self.student, self.opt_student,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return {}
        return {"student": student, "ema": ema, "opt_student": self._indexed_optimizer_state(opt)}

    def _optimizer_fqns(self) -> list[list[str]]:
        names = {id(p): n for n, p in self.student.named_parameters()}
        return [[names[id(p)] for p in g["params"]] for g in self.opt_student.param_groups]

    def _indexed_optimizer_state(self, named: dict) -> dict:
        """torch.distributed.checkpoint's optimiser state (keyed by parameter name) -> optimizer.state_dict()'s."""
        state, groups, index = {}, [], 0
        for fqns, group in zip(self._optimizer_fqns(), named["param_groups"]):
            ids = []
            for fqn in fqns:
                if fqn in named["state"]:
                    state[index] = named["state"][fqn]
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def _named_optimizer_state(self, indexed: dict) -> dict:
        state, groups = {}, []
        for fqns, group in zip(self._optimizer_fqns(), indexed["param_groups"]):
            for fqn, index in zip(fqns, group["params"]):
                if index in indexed["state"]:
                    state[fqn] = indexed["state"][index]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(fqns)})
        return {"state": state, "param_groups": groups}

    def _load_student_states(self, state: dict) -> None:
        if not self.fsdp:
            return super()._load_student_states(state)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True)  # every rank read the file: each keeps its own shards
        set_model_state_dict(self.student, state["student"], options=full)
        if self.ema is not None:
            set_model_state_dict(self.ema, state["ema"], options=full)
        set_optimizer_state_dict(self.student, self.opt_student, self._named_optimizer_state(state["opt_student"]),
                                 options=full)

    def save_checkpoint(self, path=None):
        path = path or (os.path.join(self.config.out_dir, "checkpoint.pt") if self.config.out_dir else None)
        if self.fsdp:
            self._full_states = self._gather_student_states()
        try:
            return self._save_checkpoint_rank0(path)
        finally:
            self._full_states = None

    def _save_checkpoint_rank0(self, path):
        if self.ctx.is_main:
            path = super().save_checkpoint(path)
            folder = os.path.dirname(os.path.abspath(path))
            tmp = os.path.join(folder, f"{WORLD_FILE}.tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump({"world_size": self.ctx.world_size, "step": self.step}, f)
            os.replace(tmp, os.path.join(folder, WORLD_FILE))
        elif self._pending:
            self._flush_log(0.0)
        self.ctx.barrier()
        return path

    def load_checkpoint(self, path):
        sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), WORLD_FILE)
        saved = 1
        if os.path.exists(sidecar):
            with open(sidecar) as f:
                saved = int(json.load(f).get("world_size", 1))
        if saved != self.ctx.world_size:
            raise CheckpointError(f"checkpoint {path} was written by a run on {saved} process(es) ({sidecar}); this "
                                  f"run has {self.ctx.world_size}: resume with the same world size (the per-rank "
                                  f"batch and data streams depend on it)")
        return super().load_checkpoint(path)


def config_with(config, **changes):
    """A copy of a DistillConfig with some fields changed (validated again)."""
    return dataclasses.replace(config, **changes)
