"""NitroDistiller on torch.distributed (issue 13): a 2-process gloo run on tiny models equals a 1-process run with
the doubled batch (loss curve and final student / heads weights, fp32 tolerance), the heads' all-reduce sends
only the sampled rows' values, a resumed 2-process run continues exactly, and a different world size is refused."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

from nitrokernels.nitro.distiller import CheckpointError, DistillConfig, PromptBank  # noqa: E402
from nitrokernels.nitro.distributed import (DistContext, DistributedNitroDistiller,  # noqa: E402
                                            allreduce_sparse_grads_)

DISC = dict(t_star=(10, 500), pool_sizes=2, heads_sampled=1, t_star_sampled=1, hidden=8, num_groups=4, local_size=4,
            refresh_rate=0.5, refresh_min_updates=0, head_backend="eager")
BATCH = 2  # per rank


def _models():
    from diffusers import DDIMScheduler, UNet2DConditionModel

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = UNet2DConditionModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                       attention_head_dim=4, norm_num_groups=8)
    bank = PromptBank({"encoder_hidden_states": torch.randn(7, 1, 16, generator=gen)},
                      {"encoder_hidden_states": torch.randn(1, 1, 16, generator=gen)})
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    return teacher, copy.deepcopy(teacher), sched, bank


def _config(batch, steps, out_dir=None, resume=False):
    return DistillConfig(steps=steps, batch_size=batch, grad_accum=2, lr_student=1e-4, lr_heads=1e-3, shift=250,
                         teacher_steps=2, train_steps=(1, 2), d_steps=1, ema_decay=0.9, seed=3, device="cpu",
                         out_dir=out_dir, log_every=1, progress=False, resume=resume, discriminator=dict(DISC))


def _distiller(ctx, batch, steps, out_dir=None, resume=False, fsdp=False):
    teacher, student, sched, bank = _models()
    return DistributedNitroDistiller(teacher, student, sched, bank, _config(batch, steps, out_dir, resume), ctx=ctx,
                                     check_indices=True, fsdp=fsdp)


def _result(d):
    # full_student_state_dict: under fsdp a collective that gathers the shards (rank 0 gets them)
    return {"history": d.history, "student": d.full_student_state_dict(), "ema": d.full_student_state_dict(ema=True),
            "heads": {k: v.clone() for k, v in d.disc.heads_state_dict().items()},
            "sent": list(d.heads_allreduce_numel), "fsdp": d.fsdp,
            "sharded": [type(p).__name__ for p in d.student.parameters()],
            "dense": sum(p.numel() for p in d.disc.head_parameters()), "step": d.step}


def _worker(rank, world, init_file, steps, out_dir, result_path, resume, fsdp=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        d = _distiller(DistContext(rank, world, 0, "gloo"), BATCH, steps, out_dir, resume, fsdp)
        d.train()
        result = _result(d)
        if rank == 0:
            torch.save(result, result_path)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, name, steps, out_dir, resume=False, fsdp=False):
    init = tmp_path / f"{name}.init"
    result = tmp_path / f"{name}.pt"
    mp.spawn(_worker, args=(2, str(init), steps, str(out_dir), str(result), resume, fsdp), nprocs=2, join=True)
    return torch.load(result, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ref = _distiller(DistContext(), 2 * BATCH, 3)          # one process, the doubled batch
    ref.train()
    two = _spawn(tmp, "two", 3, tmp / "two")                  # two processes, 3 iterations straight
    _spawn(tmp, "first", 2, tmp / "split")                    # two processes, 2 iterations ...
    resumed = _spawn(tmp, "resumed", 3, tmp / "split", resume=True)  # ... and resumed to 3
    return _result(ref), two, resumed, tmp


def _close(a, b, what, rtol=1e-4, atol=1e-5):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what}.{k}: {m}")


def test_two_processes_equal_one_with_the_doubled_batch(runs):
    ref, two, _, _ = runs
    assert [r["step"] for r in two["history"]] == [1, 2, 3]
    for r1, r2 in zip(ref["history"], two["history"]):
        assert r1["t_star"] == r2["t_star"] and r1["student_t"] == r2["student_t"]   # the same shared draws
        for key in ("d_loss", "g_loss", "grad_norm", "d_accuracy"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-5), (key, r1[key], r2[key])
    # AdamW divides by the gradients' RMS, so where a gradient is ~eps an fp32 reduction-order difference moves an
    # element by a fraction of the lr (seen: 1.7e-5 of the student's 1e-4, one element in 9216). A wrong gradient
    # moves elements by ~lr per step: the tolerance is a quarter of one step, the weights move by several steps.
    lr_student, lr_heads = _config(BATCH, 1).lr_student, _config(BATCH, 1).lr_heads
    _close(ref["student"], two["student"], "student", atol=lr_student / 4)
    _close(ref["heads"], two["heads"], "heads", atol=lr_heads / 20)
    start = _models()[1].state_dict()
    moved = max((two["student"][k] - start[k]).abs().max().item() for k in two["student"])
    assert moved > lr_student  # the student did train, by more than the tolerance (not untouched weights)


def test_heads_allreduce_sends_only_the_sampled_rows(runs):
    _, two, _, _ = runs
    # one all-reduce per heads optimiser step (d_steps=1: one per iteration) of the sampled rows' values: one t*
    # group of two (1/2) and one head of two per level (1/2) -> a quarter of the pool's elements
    assert len(two["sent"]) == 3
    assert all(n * 4 == two["dense"] for n in two["sent"]), (two["sent"], two["dense"])


def test_resumed_two_process_run_continues_exactly(runs):
    _, two, resumed, tmp = runs
    assert resumed["step"] == 3 and [r["step"] for r in resumed["history"]] == [1, 2, 3]
    for a, b in zip(two["history"], resumed["history"]):
        assert a["d_loss"] == b["d_loss"] and a["g_loss"] == b["g_loss"]
    for part in ("student", "heads"):
        for k in two[part]:
            assert torch.equal(two[part][k], resumed[part][k]), (part, k)
    import json

    rows = [json.loads(line) for line in open(tmp / "split" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]         # rank 0 alone wrote the log
    assert json.load(open(tmp / "split" / "distributed.json"))["world_size"] == 2


def test_resume_with_another_world_size_is_refused(runs):
    _, _, _, tmp = runs
    d = _distiller(DistContext(), BATCH, 4, str(tmp / "split"), resume=True)
    with pytest.raises(CheckpointError, match="2 process"):
        d.train()


@pytest.fixture(scope="module")
def fsdp_runs(runs):
    """The same 2-process runs with the student (and its EMA) sharded by FSDP2 on gloo."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    ref, ddp, _, tmp = runs
    two = _spawn(tmp, "fsdp_two", 3, tmp / "fsdp_two", fsdp=True)
    _spawn(tmp, "fsdp_first", 2, tmp / "fsdp_split", fsdp=True)
    resumed = _spawn(tmp, "fsdp_resumed", 3, tmp / "fsdp_split", resume=True, fsdp=True)
    return ref, ddp, two, resumed, tmp


def test_fsdp_two_processes_equal_one_with_the_doubled_batch(fsdp_runs):
    ref, _, two, _, _ = fsdp_runs
    assert two["fsdp"] and set(two["sharded"]) == {"DTensor"}   # the student really was sharded
    for r1, r2 in zip(ref["history"], two["history"], strict=True):
        assert r1["t_star"] == r2["t_star"] and r1["student_t"] == r2["student_t"]
        for key in ("d_loss", "g_loss", "grad_norm", "d_accuracy"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-5), (key, r1[key], r2[key])
    lr_student, lr_heads = _config(BATCH, 1).lr_student, _config(BATCH, 1).lr_heads
    _close(ref["student"], two["student"], "student", atol=lr_student / 4)   # see the DDP test for the tolerance
    _close(ref["ema"], two["ema"], "ema", atol=lr_student / 4)
    _close(ref["heads"], two["heads"], "heads", atol=lr_heads / 20)
    assert all(n * 4 == two["dense"] for n in two["sent"])  # the heads' sparse all-reduce is unchanged


def test_fsdp_resumed_run_continues_exactly(fsdp_runs):
    _, _, two, resumed, _ = fsdp_runs
    assert resumed["step"] == 3 and [r["step"] for r in resumed["history"]] == [1, 2, 3]
    for a, b in zip(two["history"], resumed["history"]):
        assert a["d_loss"] == b["d_loss"] and a["g_loss"] == b["g_loss"]
    for part in ("student", "ema", "heads"):
        for k in two[part]:
            assert torch.equal(two[part][k], resumed[part][k]), (part, k)


def test_fsdp_checkpoint_is_the_unsharded_format(fsdp_runs):
    """An FSDP2 run's checkpoint holds the full student / EMA / optimiser states, keyed as a DDP run's (parameter
    index), equal to what was trained: it does not depend on the sharding."""
    from nitrokernels.nitro.distiller import read_checkpoint

    _, _, two, _, tmp = fsdp_runs
    sharded, plain = read_checkpoint(str(tmp / "fsdp_two" / "checkpoint.pt")), read_checkpoint(str(tmp / "two" / "checkpoint.pt"))
    for part in ("student", "ema"):
        assert sharded[part].keys() == plain[part].keys()
        for k, v in sharded[part].items():
            assert type(v) is torch.Tensor and v.shape == plain[part][k].shape and torch.equal(v, two[part][k])
    opt, ref = sharded["opt_student"], plain["opt_student"]
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref["param_groups"]]
    assert opt["state"].keys() == ref["state"].keys() and all(isinstance(k, int) for k in opt["state"])
    for index, entry in opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert type(entry[key]) is torch.Tensor and entry[key].shape == ref["state"][index][key].shape
            torch.testing.assert_close(entry[key], ref["state"][index][key], rtol=1e-3, atol=1e-6)


def test_fsdp_refuses_a_lora_student():
    teacher, student, sched, bank = _models()
    with pytest.raises(ValueError, match="LoRA student"):
        DistributedNitroDistiller(teacher, student, sched, bank, _config(BATCH, 1), fsdp=True,
                                  trainable=lambda name: "attn" in name)


def test_one_process_is_the_plain_distiller():
    """world_size 1: the same draws and results as NitroDistiller itself."""
    from nitrokernels.nitro.distiller import NitroDistiller

    teacher, student, sched, bank = _models()
    plain = NitroDistiller(teacher, student, sched, bank, _config(BATCH, 2))
    plain.train()
    mine = _distiller(DistContext(), BATCH, 2)
    mine.train()
    for a, b in zip(plain.history, mine.history):
        assert a["d_loss"] == b["d_loss"] and a["g_loss"] == b["g_loss"]


def _sparse_worker(rank, world, init_file, result_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        p = torch.nn.Parameter(torch.zeros(6, 3))
        q = torch.nn.Parameter(torch.zeros(4, 2))
        rows = torch.tensor([[4, 1, 4]])  # uncoalesced (row 4 twice)
        p.grad = torch.sparse_coo_tensor(rows, torch.full((3, 3), float(rank + 1)), (6, 3))
        q.grad = torch.full((4, 2), float(10 * (rank + 1)))  # a dense gradient joins the same buffer
        sent = allreduce_sparse_grads_([p, q], world, check_indices=True)
        bad = None
        p.grad = torch.sparse_coo_tensor(torch.tensor([[rank]]), torch.ones(1, 3), (6, 3))
        try:
            allreduce_sparse_grads_([p], world, check_indices=True)
        except RuntimeError as err:
            bad = str(err)
        if rank == 0:
            torch.save({"sent": sent, "q": q.grad.clone(), "bad": bad}, result_path)
    finally:
        dist.destroy_process_group()


def test_allreduce_sparse_grads_averages_values_only(tmp_path):
    result = tmp_path / "r.pt"
    mp.spawn(_sparse_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True)
    out = torch.load(result)
    assert out["sent"] == 2 * 3 + 4 * 2          # coalesced rows {1, 4} x 3 values + the dense 4 x 2
    assert torch.equal(out["q"], torch.full((4, 2), 15.0))
    assert out["bad"] is not None and "different head rows" in out["bad"]


def test_fsdp2_sharding_plan_on_meta(tmp_path):
    """shard_unet (the FSDP2 plan of `distill --fsdp`) over a 1-process gloo group on the meta device, on a UNet
    the size of the test's SD-style config: every student parameter becomes a DTensor sharded on dim 0, and each
    down / mid / up block is its own FSDP unit."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    from diffusers import UNet2DConditionModel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        with torch.device("meta"):
            unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                        block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=8,
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        from nitrokernels.nitro.distributed import shard_unet

        shard_unet(unet, mesh)
        params = list(unet.parameters())
        assert params and all(isinstance(p, DTensor) for p in params)
        assert all(p.placements == (Shard(0),) for p in params)
        units = [m for m in unet.modules() if isinstance(m, fsdp.FSDPModule)]
        assert units[0] is unet and len(units) == 1 + len(unet.down_blocks) + 1 + len(unet.up_blocks)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_cli_equals_one_process_with_the_doubled_batch(tmp_path, mode):
    """`torchrun --nproc_per_node=2 -m nitrokernels distill --preset digits [--fsdp]` (batch 1 per process) writes
    the same run folder, loss curve and final student/ as the plain command with batch 2."""
    import json
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("no torchrun on PATH")
    disc = json.dumps({"t_star": [10, 500], "pool_sizes": 2, "heads_sampled": 1, "t_star_sampled": 1, "hidden": 8,
                       "num_groups": 4})
    common = ["-m", "nitrokernels", "distill", "--preset", "digits", "--steps", "2", "--no-progress",
              "--log-every", "1", "--discriminator", disc, "--sample-count", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", *common, "--out", str(tmp_path / "two"),
                          "--batch-size", "1", *(["--fsdp"] if mode == "fsdp" else [])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert ("student sharded: FSDP2" in two.stdout) == (mode == "fsdp"), two.stdout[-2000:]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one"), "--batch-size", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("checkpoint.pt", "log.jsonl", "loss.png", "samples_000002.png", "student/config.json"):
        assert (tmp_path / "two" / name).exists() and (tmp_path / "one" / name).exists(), name
    rows = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]
    assert [r["step"] for r in rows[1]] == [1, 2]
    for a, b in zip(*rows):   # (the preset may begin with regression warm-up iterations: regression_loss only)
        keys = [k for k in ("d_loss", "g_loss", "regression_loss") if k in a]
        assert keys and keys == [k for k in ("d_loss", "g_loss", "regression_loss") if k in b]
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4), (k, a[k], b[k])
    from safetensors.torch import load_file

    weights = [load_file(str(tmp_path / run / "student" / "diffusion_pytorch_model.safetensors")) for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        # a quarter of the warm-up's AdamW step (regression_lr 2e-4): see the tolerance of the in-process test
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=5e-5, msg=lambda m: f"{k}: {m}")
