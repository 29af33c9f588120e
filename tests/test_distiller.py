"""NitroDistiller on tiny digits and SDXL-like configs.

* the student's one-step x̂0 is exactly TimestepShiftLCMScheduler's 1-step sample (nitro.sampling.sample), and the
  multi-step training (backward simulation) feeds it exactly the inputs and timesteps the 1-4-step sampler does;
* the method, not only the plumbing: with the student frozen the discriminator learns to tell real from fake;
  with the heads frozen the generator loss falls; EMA follows its closed form; grad_accum k x batch b is one
  batch of k*b; a train step refreshes heads and resets exactly their optimiser rows;
* a short run with the eager head backend and the same run with the fused (Triton) heads give matching loss
  curves (a convergence check, as kernel libraries do);
* resuming from a checkpoint reproduces the uninterrupted run's next losses exactly; a corrupt or mismatched
  checkpoint is refused and the previous checkpoint survives a failed write (atomic writes);
* SDXL-style conditioning (text embeddings + added time ids) trains; weights load from safetensors paths.
"""
import copy
import json
import os

import pytest
import torch

from nitrokernels.digits import data as digits
from nitrokernels.nitro.distiller import (CheckpointError, DistillConfig, NitroDistiller, PromptBank,
                                          load_unet_weights, save_image_grid)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# one t* group per iteration and refresh of any head keep these plumbing tests fast and the refresh exercised
DISC = dict(pool_sizes=2, hidden=16, num_groups=4, local_size=4, head_backend="eager", t_star_sampled=1,
            refresh_min_updates=0)


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4)
    return digits.make_digits_unet(**{**config, **overrides})


def tiny_bank():
    torch.manual_seed(1)
    enc = digits.DigitsEncoder(dim=8)
    with torch.no_grad():
        return PromptBank({"encoder_hidden_states": enc(torch.arange(10))}, {"encoder_hidden_states": enc.empty(1)})


def make(teacher=None, **overrides):
    teacher = teacher or tiny_unet()
    disc = {**DISC, **overrides.pop("discriminator", {})}
    config = DistillConfig(**{**dict(steps=4, batch_size=2, teacher_steps=2, lr_student=1e-3, lr_heads=1e-3,
                                     progress=False, log_every=1, device=str(DEVICE), discriminator=disc), **overrides})
    return NitroDistiller(teacher, copy.deepcopy(teacher), digits.make_teacher_scheduler(), tiny_bank(), config)


def losses(history):
    return [(r["d_loss"], r["g_loss"]) for r in history]


# ------------------------------------------------------------------------------------------------ basics
def test_student_one_step_is_the_lcm_schedulers_one_step_sample():
    from nitrokernels.nitro.sampling import sample

    d = make(shift=250)
    assert d.student_t == 249 and d.student_lcm_t == 999
    noise = torch.randn(3, 1, 16, 16, device=DEVICE)
    cond, _ = d.prompts.take(torch.tensor([1, 2, 3]), DEVICE)
    with torch.no_grad():
        mine = d.student_x0(noise, cond)
        ref = sample(lambda x, t: d.student(x, t, **cond).sample, d.student_scheduler, noise, 1, None)
    torch.testing.assert_close(mine, ref.float(), rtol=0, atol=0)
    assert make(shift=500).student_t == 499


def test_training_changes_student_and_heads_and_logs(tmp_path):
    d = make(out_dir=str(tmp_path), steps=3, ema_decay=0.5, sample_every=2)
    student0 = copy.deepcopy(d.student.state_dict())
    heads0 = copy.deepcopy(d.disc.heads_state_dict())
    teacher0 = copy.deepcopy(d.teacher.state_dict())
    history = d.train()
    assert [r["step"] for r in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for r in history for v in (r["d_loss"], r["g_loss"]))
    assert any(not torch.equal(v, d.student.state_dict()[k]) for k, v in student0.items())
    assert any(not torch.equal(v, d.disc.heads_state_dict()[k]) for k, v in heads0.items())
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in teacher0.items()), "the teacher is frozen"
    assert any(not torch.equal(v, d.ema.state_dict()[k]) for k, v in student0.items())
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"d_loss", "g_loss", "grad_norm", "global_conditional/d_accuracy", "local_unconditional/g_loss",
            "d_accuracy", "logit_gap", "head_age", "global_conditional/logit_gap", "local_conditional/head_age",
            "student_t"} <= set(rows[0])
    assert (tmp_path / "samples_000002.png").exists() and (tmp_path / "samples_000003.png").exists()
    assert (tmp_path / "checkpoint.pt").exists()


def test_config_validation():
    for kwargs, match in [(dict(batch_size=0), "batch_size"), (dict(grad_accum=0), "grad_accum"),
                          (dict(shift=0), "shift"), (dict(shift=1001), "shift"), (dict(ema_decay=1.0), "ema_decay"),
                          (dict(grad_clip=0), "grad_clip"), (dict(mixed_precision="fp8"), "mixed_precision"),
                          (dict(lr_student=-1), "lr_student"), (dict(steps=-1), "steps"),
                          (dict(d_steps=0), "d_steps"), (dict(train_steps=()), "train_steps"),
                          (dict(train_steps=(1, 1)), "train_steps"), (dict(train_steps=(0,)), "train_steps"),
                          (dict(train_steps=4), "train_steps")]:
        with pytest.raises(ValueError, match=match):
            DistillConfig(**kwargs)
    with pytest.raises(ValueError, match="different modules"):
        unet = tiny_unet()
        NitroDistiller(unet, unet, digits.make_teacher_scheduler(), tiny_bank(), DistillConfig(discriminator=DISC))
    with pytest.raises(ValueError, match="every pool is empty"):
        make(discriminator=dict(pool_sizes=0))


def test_same_seed_same_run_and_heads_init_from_seed():
    torch.manual_seed(123)
    a = make(steps=3)
    torch.manual_seed(456)  # the global RNG must not matter
    b = make(steps=3)
    for k, v in a.disc.heads_state_dict().items():
        assert torch.equal(v, b.disc.heads_state_dict()[k])
    assert losses(a.train()) == losses(b.train())
    c = make(steps=3, seed=1)
    assert losses(c.train()) != losses(a.history)


# ------------------------------------------------------------------------------------------ the method
def _mean(values):
    return sum(values) / len(values)


def test_frozen_student_lets_the_discriminator_learn():
    """lr_student 0: the fakes stay put, so a working discriminator phase must separate them from the teacher's
    samples well above chance (0.5) within a few dozen updates. A flipped D-loss sign drives the accuracy to 0;
    a skipped heads step leaves it at chance."""
    d = make(steps=30, lr_student=0.0, lr_heads=2e-3, train_steps=(1,),
             discriminator=dict(pool_sizes={"global_conditional": 1, "local_conditional": 1}, t_star=(250,),
                                refresh_rate=0.0))
    student0 = copy.deepcopy(d.student.state_dict())
    acc = [r["d_accuracy"] for r in d.train()]
    assert all(torch.equal(v, d.student.state_dict()[k]) for k, v in student0.items()), "the student is frozen"
    assert _mean(acc[-10:]) >= 0.8, acc
    assert _mean(acc[-10:]) > _mean(acc[:3]) + 0.15, acc


def test_frozen_heads_let_the_generator_loss_fall():
    """lr_heads 0, no refresh and one head per level: the student plays against fixed heads, so a working
    generator phase makes the heads score its samples as more real (the fake logit, measured in the next
    iteration's discriminator phase, rises) and lowers the generator loss. A flipped G-loss sign lowers the logit
    (its own, flipped, loss would still fall: the logit is the independent measure)."""
    d = make(steps=30, lr_heads=0.0, lr_student=2e-3, train_steps=(1,),
             discriminator=dict(pool_sizes={"global_conditional": 1}, t_star=(250,), refresh_rate=0.0))
    heads0 = copy.deepcopy(d.disc.heads_state_dict())
    history = d.train()
    g = [r["g_loss"] for r in history]
    fake = [r["global_conditional/fake_logit"] for r in history]
    assert all(torch.equal(v, d.disc.heads_state_dict()[k]) for k, v in heads0.items() if not k.startswith("ages.")), \
        "the heads are frozen"
    assert _mean(fake[-8:]) > _mean(fake[:4]) + 0.05, fake
    assert _mean(g[-8:]) < _mean(g[:4]) - 0.25, g


def test_ema_follows_its_closed_form():
    """ema_K = decay^K theta_0 + sum_k (1 - decay) decay^(K - k) theta_k over the student's weights theta_k after
    each step (an inverted decay or a missed update breaks it)."""
    decay = 0.7
    d = make(steps=4, ema_decay=decay, lr_student=1e-2)
    thetas = [{k: v.detach().clone().double() for k, v in d.student.named_parameters()}]
    d.train(callback=lambda step, result: thetas.append(
        {k: v.detach().clone().double() for k, v in d.student.named_parameters()}))
    steps = len(thetas) - 1
    assert steps == 4
    for name, value in d.ema.named_parameters():
        expected = decay ** steps * thetas[0][name]
        for k in range(1, steps + 1):
            expected = expected + (1 - decay) * decay ** (steps - k) * thetas[k][name]
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(thetas[0][k], thetas[-1][k]) for k in thetas[0])


def _capture_gradients(optimizer, store):
    def step(*args, **kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    store.append(p.grad.to_dense().clone() if p.grad.is_sparse else p.grad.clone())
    optimizer.step = step


def test_grad_accum_k_micro_batches_equal_one_batch_of_k_b(monkeypatch):
    """The same 6 images as 3 micro-batches of 2 (grad_accum 3) or one batch of 6: identical gradients for the
    heads and the student. The discriminator's re-noising is made the identity (alphas_cumprod 1) so both runs
    see the same inputs whatever order the noise is drawn in."""
    from nitrokernels.nitro.distiller import _MicroBatch

    k, b = 3, 2
    noise = torch.randn(k * b, 1, 16, 16, device=DEVICE)
    bank = tiny_bank()
    cond, uncond = bank.take(torch.arange(k * b) % 10, DEVICE)
    grads = {}
    for accum in (k, 1):
        disc = dict(alphas_cumprod=torch.ones(1000), refresh_rate=0.0)
        d = make(steps=1, batch_size=k * b // accum, grad_accum=accum, train_steps=(1,), discriminator=disc)
        size = k * b // accum
        chunks = [_MicroBatch(noise[i * size:(i + 1) * size], {n: v[i * size:(i + 1) * size] for n, v in cond.items()},
                              {n: v[i * size:(i + 1) * size] for n, v in uncond.items()}, 1, 0,
                              noise[i * size:(i + 1) * size]) for i in range(accum)]
        monkeypatch.setattr(d, "_micro_batches", lambda chunks=chunks: chunks)
        heads, student = [], []
        _capture_gradients(d.opt_heads, heads)
        _capture_gradients(d.opt_student, student)
        d.train_step()
        grads[accum] = (heads, student)
    (h3, s3), (h1, s1) = grads[k], grads[1]
    assert len(h3) == len(h1) > 0 and len(s3) == len(s1) > 0
    for a, b_ in zip(h3 + s3, h1 + s1):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in h1) and any(g.abs().sum() > 0 for g in s1)


def test_train_step_refreshes_heads_and_resets_exactly_their_optimiser_rows(monkeypatch):
    d = make(steps=3, discriminator=dict(pool_sizes=4, refresh_rate=0.3, refresh_min_updates=1))
    refreshed = []
    for key, pool in d.disc.pools.items():
        original = pool.reset_heads_

        def record(ids, *args, key=key, original=original, **kwargs):
            refreshed.append((key, torch.as_tensor(ids).tolist()))
            return original(ids, *args, **kwargs)

        monkeypatch.setattr(pool, "reset_heads_", record)
    selection_seen = []
    original_record = d.disc.record_updates
    monkeypatch.setattr(d.disc, "record_updates", lambda sel: (selection_seen.append(sel), original_record(sel)))
    for _ in range(3):
        refreshed.clear()
        selection_seen.clear()
        ages_before = {k: v.clone() for k, v in d.disc.head_ages().items()}
        d.train_step()
        assert refreshed, "refresh_every=1 must refresh heads every step"
        fresh = {(key, head) for key, ids in refreshed for head in ids}
        sel = selection_seen[0]
        updated = {(d.disc._key(ti, kind), h) for (ti, kind), ids in sel.ids.items() for h in ids.tolist()}
        for key, head in fresh:  # only heads with at least one update are eligible
            assert ages_before[key][head] >= 1 or (key, head) in updated
        for key, pool in d.disc.pools.items():
            ages = d.disc.head_ages()[key]
            for head in range(pool.num_heads):
                level, row = divmod(head, pool.heads_per_level)
                rows_state = [d.opt_heads.state[p] for p in pool.pools[level].parameters() if p in d.opt_heads.state]
                moved = [float(s["exp_avg"][row].abs().sum()) for s in rows_state]
                if (key, head) in fresh:
                    assert int(ages[head]) == 0
                    assert all(m == 0 for m in moved), "a refreshed head's optimiser rows are reset"
                    assert all(float(s["step"][row]) == 0 for s in rows_state)
                elif (key, head) in updated:
                    assert int(ages[head]) == int(ages_before[key][head]) + 1
                    assert any(m > 0 for m in moved), "an updated head keeps its optimiser state"


def test_multi_step_training_feeds_the_student_what_the_sampler_does():
    from nitrokernels.nitro.sampling import sample

    d = make(steps=1, train_steps=(1, 2, 4))
    seen = []
    handle = d.student.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].reshape(-1)[0])))
    noise = torch.randn(2, 1, 16, 16, device=DEVICE)
    cond, _ = d.prompts.take(torch.tensor([3, 4]), DEVICE)
    allowed = set()
    with torch.no_grad():
        for n in (1, 2, 4):
            seen.clear()
            sample(lambda x, t: d.student(x, t, **cond).sample, d.student_scheduler, noise, n, None)
            allowed |= set(seen)
    assert allowed == {249, 187, 124, 62}
    # every (steps, index) of the configured step counts is drawn
    draws = {d._draw_step() for _ in range(200)}
    assert draws == {(1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)}
    # the simulated input of step i is the sampler's state before step i (same re-noising noise)
    for steps, index in ((4, 3), (2, 1), (4, 1)):
        state = d.dev_gen.get_state()
        x = d.simulate_input(noise, cond, steps, index)
        gen = torch.Generator(device=DEVICE)
        gen.set_state(state)
        sched = d.student_scheduler
        sched.set_timesteps(steps)
        ref = noise
        with torch.no_grad():
            for lcm, model_t in list(zip(sched.lcm_timesteps.tolist(), sched.model_timesteps.tolist()))[:index]:
                out = d.student(ref, torch.full((2,), model_t), **cond).sample
                ref, _ = sched.step(out, lcm, ref, generator=gen, return_dict=False)
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
        assert not torch.equal(x, noise)
    # and training calls the student at those timesteps only, logging which one each micro-batch trained
    seen.clear()
    d.config.grad_accum = 4
    logged = []
    for _ in range(3):
        logged += d.train_step()["student_t"]
    handle.remove()
    assert set(seen) <= allowed and set(logged) <= allowed and len(set(logged)) > 1
    one = make(steps=1, train_steps=(1,))
    assert one.train_step()["student_t"] == [249]


# ------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_the_fp32_run(precision):
    """Autocast of the UNet forwards (CPU autocast here): the same run's losses stay near fp32's, the student
    moves, and fp16's loss scaler is active."""
    full = make(steps=3)
    reference = torch.tensor(losses(full.train()))
    d = make(steps=3, mixed_precision=precision)
    assert d.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert d.scaler.is_enabled() == (precision == "fp16")
    start = [p.detach().clone() for p in d.student.parameters()]
    mixed = torch.tensor(losses(d.train()))
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0], reference[0], rtol=5e-2, atol=5e-2)  # same inputs, lower precision
    assert any(not torch.equal(a, p) for a, p in zip(start, d.student.parameters()))
    assert all(p.dtype == torch.float32 for p in d.student.parameters())  # fp32 master weights


def test_fp16_scaler_state_resumes(tmp_path):
    full = make(steps=4, mixed_precision="fp16")
    reference = losses(full.train())
    first = make(steps=2, mixed_precision="fp16", out_dir=str(tmp_path))
    first.train()
    resumed = make(steps=4, mixed_precision="fp16", out_dir=str(tmp_path), resume=True)
    assert resumed.scaler.get_scale() == first.scaler.get_scale()
    assert losses(resumed.train())[2:] == reference[2:]


# ------------------------------------------------------------------------------------------ backends
def curve_steps() -> int:
    """Iterations of the backend loss-curve test: 300 on a GPU; on the CPU the Triton interpreter takes ~5 s an
    iteration even at the micro config, so CI runs 5 and NITROKERNELS_CURVE_STEPS=200 runs the long check."""
    default = 300 if DEVICE.type == "cuda" else 5
    return int(os.environ.get("NITROKERNELS_CURVE_STEPS", default))


def head_backend_curves(steps: int) -> dict[str, torch.Tensor]:
    """(d_loss, g_loss) per iteration of the same seeded run with eager heads and with the fused Triton heads:
    a micro discriminator (one t*, one kind, hidden 8) so the interpreter can run hundreds of iterations."""
    curves = {}
    for backend in ("eager", "triton"):
        d = make(steps=steps, batch_size=2, teacher_steps=1,
                 discriminator=dict(head_backend=backend, pool_sizes={"global_conditional": 2}, t_star=(500,),
                                    hidden=8, num_groups=2, refresh_rate=0.05))
        curves[backend] = torch.tensor(losses(d.train()))
    return curves


@pytest.mark.slow
def test_loss_curves_match_across_head_backends():
    """The same run with eager heads and with the fused Triton heads (interpreter on CPU): matching curves."""
    steps = curve_steps()
    curves = head_backend_curves(steps)
    eager, fused = curves["eager"], curves["triton"]
    assert torch.isfinite(eager).all() and torch.isfinite(fused).all()
    assert not torch.equal(eager[0], eager[-1])  # the losses move: a curve, not a constant
    # identical math, different summation order: the first iterations agree tightly, and over the whole run
    # the curves track each other (no drift: a running mean over 10 iterations stays close)
    torch.testing.assert_close(fused[:5], eager[:5], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused, eager, rtol=5e-2, atol=5e-2)
    if steps >= 20:
        smooth = torch.nn.functional.avg_pool1d
        torch.testing.assert_close(smooth(fused.T[None], 10, 1)[0], smooth(eager.T[None], 10, 1)[0],
                                   rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------- regression warm-up
def _held_out_mse(d, n=8):
    """Mean squared error of the student's one-step x̂0 against the teacher's x0 on fixed noise and prompts."""
    gen = torch.Generator().manual_seed(99)
    noise = torch.randn(n, 1, 16, 16, generator=gen).to(DEVICE)
    cond, uncond = d.prompts.take(torch.arange(n) % 10, DEVICE)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(d.student_x0(noise, cond), d.teacher_x0(noise, cond, uncond)).item()


def test_regression_warmup_fits_the_one_step_student_to_the_teacher_and_leaves_the_heads_alone():
    d = make(steps=60, regression_steps=60, lr_student=1e-2, grad_clip=None, batch_size=4, train_steps=(1,))
    heads_before = copy.deepcopy(d.disc.heads_state_dict())
    before = _held_out_mse(d)
    history = d.train()
    after = _held_out_mse(d)
    assert after < 0.5 * before, f"the warm-up must fit the teacher: held-out mse {before:.4f} -> {after:.4f}"
    assert all("regression_loss" in r and "d_loss" not in r for r in history)
    assert {t for r in history for t in r["student_t"]} == {d.student_t}   # only the (paired) first step
    for k, v in heads_before.items():                                        # heads, their ages: untouched
        assert torch.equal(v, d.disc.heads_state_dict()[k]), k
    assert not d.opt_heads.state or all(not s for s in d.opt_heads.state.values())


def test_regression_loss_is_the_paired_mse_and_the_adversarial_phase_follows(monkeypatch):
    """Each warm-up step reports the mse of the student's x̂0 against the teacher's solution from the SAME input:
    from the noise for a first step, continued from the student's re-noised input at its LCM timestep for a
    later one."""
    d = make(steps=7, regression_steps=6, train_steps=(1, 2))
    seen = []
    real_step = d._regression_step
    orig_teacher, orig_student = d.teacher_x0, d.student_denoise

    def checked():
        calls = {}

        def teacher(x, cond, uncond, start_t=None, steps=None):
            calls["teacher_input"], calls["start_t"] = x, start_t
            return calls.setdefault("real", orig_teacher(x, cond, uncond, start_t=start_t, steps=steps))

        def student(x, cond, steps, index, model=None):   # the last call is the trained one (the first ones
            calls["student_input"], calls["step"] = x, (steps, index)          # simulate its input)
            calls["fake"] = orig_student(x, cond, steps, index, model)
            return calls["fake"]

        monkeypatch.setattr(d, "teacher_x0", teacher)
        monkeypatch.setattr(d, "student_denoise", student)
        out = real_step()
        monkeypatch.setattr(d, "teacher_x0", orig_teacher)
        monkeypatch.setattr(d, "student_denoise", orig_student)
        first = calls["step"][1] == 0
        assert calls["start_t"] == (None if first else 499), calls
        assert first or calls["teacher_input"] is calls["student_input"]   # the same (re-noised) input
        seen.append((calls["step"], ((calls["fake"] - calls["real"]) ** 2).mean().item()))
        return out

    monkeypatch.setattr(d, "_regression_step", checked)
    history = d.train()
    assert [("regression_loss" in r, "d_loss" in r) for r in history] == [(True, False)] * 6 + [(False, True)]
    assert [r["regression_loss"] for r in history[:6]] == pytest.approx([mse for _, mse in seen], rel=1e-5)
    assert {step for step, _ in seen} == {(1, 0), (2, 0), (2, 1)}, "seed 0 draws every step of (1, 2) in 6 tries"


def test_warmup_heads_every_trains_the_heads_on_the_teachers_sample_vs_the_students_output(monkeypatch):
    """With warmup_heads_every=2 every second warm-up iteration also takes one heads update whose real is the
    teacher's sample from the micro-batch's starting noise (also for a later step, whose regression target is
    the teacher continued from the re-noised input) and whose fake is the student's x̂0 of that iteration, made
    with the weights from before its update."""
    d = make(steps=6, regression_steps=6, warmup_heads_every=2, train_steps=(1, 2), grad_accum=2)
    heads_before = copy.deepcopy(d.disc.heads_state_dict())
    calls, batches, students = [], [], []
    orig_batches, orig_d_loss = d._micro_batches, d.disc.d_loss

    def micro_batches():
        students.append(copy.deepcopy(d.student))          # the weights this iteration's x̂0 is made with
        batches.append(orig_batches())
        return batches[-1]

    def d_loss(real, fake, cond, uncond=None, **kw):
        calls.append((d.step, len(batches) - 1, real.clone(), fake.clone()))
        return orig_d_loss(real, fake, cond, uncond, **kw)

    monkeypatch.setattr(d, "_micro_batches", micro_batches)
    monkeypatch.setattr(d.disc, "d_loss", d_loss)
    history = d.train()
    assert [c[0] for c in calls] == [2, 2, 4, 4, 6, 6]       # after the student's update of iterations 2, 4, 6
    assert [("d_loss" in r, "d_accuracy" in r) for r in history] == [(False, False), (True, True)] * 3
    assert all("regression_loss" in r and "g_loss" not in r for r in history)
    assert d.sched_heads.last_epoch == 3                     # the heads' schedule counts their iterations
    later = 0
    for n, (step, it, real, fake) in enumerate(calls):
        mb = batches[it][n % 2]
        later += mb.index > 0
        with torch.no_grad():
            torch.testing.assert_close(real, d.teacher_x0(mb.noise, mb.cond, mb.uncond), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fake, d.student_denoise(mb.x, mb.cond, mb.steps, mb.index,
                                                               model=students[it]), rtol=1e-5, atol=1e-6)
    assert later, "the heads iterations drew no later step (the case whose real differs from the regression target)"
    assert any(not torch.equal(v, d.disc.heads_state_dict()[k]) for k, v in heads_before.items())
    with pytest.raises(ValueError, match="warmup_heads_every"):
        DistillConfig(warmup_heads_every=-1)


def test_each_discriminator_round_takes_the_teachers_sample_of_its_own_noise(monkeypatch):
    """d_steps=2 x grad_accum=2: the four heads updates' reals are the teacher's samples from their own micro-batch's
    noise, made in one batched teacher call per micro-batch position (batch d_steps x batch_size), and their fakes
    the student's x̂0 of that micro-batch."""
    d = make(steps=1, d_steps=2, grad_accum=2, train_steps=(1, 2))
    student = copy.deepcopy(d.student)                       # the weights of the discriminator phase
    batches, calls, teacher_batches = [], [], []
    orig_batches, orig_d_loss, orig_teacher = d._micro_batches, d.disc.d_loss, d.teacher_x0

    def micro_batches():
        batches.extend(orig_batches())
        return batches[-2:]

    def d_loss(real, fake, cond, uncond=None, **kw):
        calls.append((real.clone(), fake.clone()))
        return orig_d_loss(real, fake, cond, uncond, **kw)

    def teacher(noise, *args, **kw):
        teacher_batches.append(noise.shape[0])
        return orig_teacher(noise, *args, **kw)

    monkeypatch.setattr(d, "_micro_batches", micro_batches)
    monkeypatch.setattr(d.disc, "d_loss", d_loss)
    monkeypatch.setattr(d, "teacher_x0", teacher)
    d.train_step()
    assert len(calls) == len(batches) == 4 and teacher_batches == [4, 4]
    assert not torch.equal(batches[0].noise, batches[2].noise), "each round draws fresh noise"
    for (real, fake), mb in zip(calls, batches):
        with torch.no_grad():
            # batch 4 vs 2 in the teacher's convolutions: float32 rounding (measured up to 5e-6)
            torch.testing.assert_close(real, orig_teacher(mb.noise, mb.cond, mb.uncond), rtol=1e-4, atol=2e-5)
            torch.testing.assert_close(fake, d.student_denoise(mb.x, mb.cond, mb.steps, mb.index, model=student),
                                       rtol=1e-5, atol=1e-6)


def test_continuation_steps_is_the_teachers_grid_for_later_step_targets(monkeypatch):
    """A later step's warm-up target continues the teacher on the continuation_steps grid (finer than the first
    step's teacher_steps); the first step's target and the discriminator's real keep teacher_steps."""
    d = make(steps=6, regression_steps=6, train_steps=(1, 2), teacher_steps=2, continuation_steps=4)
    calls, orig = [], d.teacher_x0

    def teacher(x, cond, uncond, start_t=None, steps=None):
        out = orig(x, cond, uncond, start_t=start_t, steps=steps)
        calls.append((start_t, steps, x, cond, uncond, out))
        return out

    monkeypatch.setattr(d, "teacher_x0", teacher)
    d.train()
    assert {(c[0], c[1]) for c in calls} == {(None, None), (499, 4)}
    start_t, _, x, cond, uncond, out = next(c for c in calls if c[0] is not None)
    sched = d.teacher_scheduler
    sched.set_timesteps(4)                                   # 999, 749, 499, 249: the tail from 499 is 2 steps
    y = x
    with torch.no_grad():
        for t in sched.timesteps[2:]:
            y = sched.step(d.teacher(y, t, **cond).sample, t, y).prev_sample
    torch.testing.assert_close(out, y.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, orig(x, cond, uncond, start_t=499), atol=1e-4)   # not the 2-step grid's
    with pytest.raises(ValueError, match=r"continuation_steps=3.*missing \[499\]"):
        make(regression_steps=2, train_steps=(1, 2), teacher_steps=2, continuation_steps=3)
    with pytest.raises(ValueError, match="continuation_steps"):
        DistillConfig(continuation_steps=0)


def test_teacher_continued_from_its_own_intermediate_latent_is_its_full_sample():
    """teacher_x0(start_t=t) continues the teacher's sampler: from the sampler's own latent at t it reproduces
    the full sample (the paired target of a later student step is the teacher's solution from that input)."""
    d = make(teacher_steps=4)
    noise = torch.randn(3, 1, 16, 16, device=DEVICE)
    cond, uncond = d.prompts.take(torch.tensor([4, 5, 6]), DEVICE)
    full = d.teacher_x0(noise, cond, uncond)
    sched = d.teacher_scheduler
    sched.set_timesteps(4)
    x = noise
    with torch.no_grad():
        for t in sched.timesteps[:2]:                  # 999, 749 -> the latent at 499
            x = sched.step(d.teacher(x, t, **cond).sample, t, x).prev_sample
    torch.testing.assert_close(d.teacher_x0(x, cond, uncond, start_t=499), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(d.teacher_x0(x, cond, uncond, start_t=249), full, atol=1e-3)


def test_warmup_of_later_steps_needs_the_teacher_sampler_at_the_students_timesteps():
    with pytest.raises(ValueError, match=r"teacher_steps=2.*missing \[249, 749\]"):
        make(regression_steps=2, train_steps=(1, 4), teacher_steps=2)
    make(regression_steps=2, train_steps=(1, 4), teacher_steps=4)       # 999, 749, 499, 249: fine
    make(regression_steps=2, train_steps=(1,), teacher_steps=2)         # the first step needs nothing
    make(regression_steps=0, train_steps=(1, 4), teacher_steps=2)       # no warm-up: nothing to check


def test_regression_lr_is_the_warmup_rate_and_lr_student_the_adversarial_one(monkeypatch):
    d = make(steps=4, regression_steps=2, lr_student=1e-3, regression_lr=5e-2, warmup_steps=2, train_steps=(1, 2))
    used = []
    step = d.opt_student.step
    monkeypatch.setattr(d.opt_student, "step", lambda *a, **k: (used.append(d.opt_student.param_groups[0]["lr"]),
                                                               step(*a, **k))[1])
    d.train()
    # LR ramp (warmup_steps=2): factors 1/2, 1, 1, 1; the warm-up's rate replaces lr_student, the ramp applies
    assert used == pytest.approx([2.5e-2, 5e-2, 1e-3, 1e-3])
    for bad in (0.0, -1e-3, float("nan"), "1e-3"):
        with pytest.raises(ValueError, match="regression_lr"):
            DistillConfig(regression_lr=bad)
    with pytest.raises(ValueError, match="regression_steps"):
        DistillConfig(regression_steps=-1)


def test_resume_across_the_warmup_boundary_is_exact(tmp_path):
    full = make(steps=4, regression_steps=2, train_steps=(1, 2))
    reference = full.train()
    first = make(steps=1, regression_steps=2, train_steps=(1, 2), out_dir=str(tmp_path))
    first.train()
    resumed = make(steps=4, regression_steps=2, train_steps=(1, 2), out_dir=str(tmp_path))
    history = resumed.train()
    key = lambda rows: [(r.get("regression_loss"), r.get("d_loss"), r.get("g_loss")) for r in rows]
    assert key(history) == key(reference)
    for k, v in full.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k])
    with pytest.raises(CheckpointError, match="regression_steps"):
        make(steps=4, regression_steps=3, train_steps=(1, 2)).load_checkpoint(str(tmp_path / "checkpoint.pt"))


def test_checkpoint_from_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    from nitrokernels.nitro.distiller import state_digest

    d = make(steps=1, out_dir=str(tmp_path))
    d.train()
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["regression_steps"]          # as written by a version without the field
    del state["digest"]
    state["digest"] = state_digest(state)
    torch.save(state, path)
    make(steps=2).load_checkpoint(str(path))          # its default (0) is what the old file meant
    with pytest.raises(CheckpointError, match="regression_steps"):
        make(steps=2, regression_steps=4, train_steps=(1, 2)).load_checkpoint(str(path))


# ------------------------------------------------------------------------------------------ checkpoints
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = make(steps=6, ema_decay=0.9, discriminator=dict(refresh_rate=0.2))
    reference = losses(full.train())

    first = make(steps=3, ema_decay=0.9, out_dir=str(tmp_path), discriminator=dict(refresh_rate=0.2))
    first.train()
    assert losses(first.history) == reference[:3]
    resumed = make(steps=6, ema_decay=0.9, out_dir=str(tmp_path), discriminator=dict(refresh_rate=0.2))
    history = resumed.train()  # resume=True: picks up checkpoint.pt at step 3
    assert resumed.step == 6
    assert losses(history) == reference, "a resumed run must continue the identical loss curve"
    for k, v in full.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k])
    for k, v in full.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k])
    for k, v in full.disc.heads_state_dict().items():
        assert torch.equal(v, resumed.disc.heads_state_dict()[k])
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_corrupt_checkpoint_is_refused_and_nothing_changes(tmp_path):
    d = make(steps=2, out_dir=str(tmp_path))
    d.train()
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    fresh = make(steps=2)
    before = copy.deepcopy(fresh.student.state_dict())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        fresh.load_checkpoint(str(bad))
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        fresh.load_checkpoint(str(bad))
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(CheckpointError, match="not a NitroDistiller checkpoint"):
        fresh.load_checkpoint(str(bad))
    assert fresh.step == 0
    for k, v in before.items():
        assert torch.equal(v, fresh.student.state_dict()[k])
    fresh.load_checkpoint(str(path))  # the good one still loads
    assert fresh.step == 2


def test_mismatched_checkpoint_is_refused(tmp_path):
    d = make(steps=1, out_dir=str(tmp_path))
    d.train()
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="different configuration.*batch_size"):
        make(batch_size=3).load_checkpoint(path)
    with pytest.raises(CheckpointError, match="different configuration"):
        make(discriminator=dict(pool_sizes=3)).load_checkpoint(path)
    with pytest.raises(CheckpointError, match="different student"):
        make(teacher=tiny_unet(block_out_channels=(8, 24))).load_checkpoint(path)
    with pytest.raises(CheckpointError, match="ema_decay"):
        make(ema_decay=0.9).load_checkpoint(path)
    # steps / logging may change on resume
    make(steps=10, log_every=5).load_checkpoint(path)


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    d = make(steps=1, out_dir=str(tmp_path))
    d.train()
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    d.step += 1

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        d.save_checkpoint()
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    restored = make(steps=1)
    restored.load_checkpoint(str(path))
    assert restored.step == 1


# ------------------------------------------------------------------------------------------ SDXL-like
def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 6 * 4)


def test_sdxl_like_conditioning_trains_and_resumes(tmp_path):
    from diffusers import EulerDiscreteScheduler

    teacher = tiny_sdxl_unet()
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]])
    bank = PromptBank({"encoder_hidden_states": torch.randn(6, 7, 12),
                       "added_cond_kwargs": {"text_embeds": torch.randn(6, 12), "time_ids": time_ids.repeat(6, 1)}},
                      {"encoder_hidden_states": torch.zeros(1, 7, 12),
                       "added_cond_kwargs": {"text_embeds": torch.zeros(1, 12), "time_ids": time_ids}})
    # a non-DDIM teacher sampler with classifier-free guidance
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="trailing")
    config = DistillConfig(steps=2, batch_size=2, grad_accum=2, teacher_steps=2, teacher_guidance=2.0,
                           progress=False, log_every=1, out_dir=str(tmp_path), discriminator=DISC)
    d = NitroDistiller(teacher, copy.deepcopy(teacher), sched, bank, config)
    history = d.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor([r["d_loss"], r["g_loss"]])).all() for r in history)
    assert (tmp_path / "samples_000002.png").exists()
    d2 = NitroDistiller(teacher, copy.deepcopy(teacher), sched, bank,
                        DistillConfig(**{**config.__dict__, "steps": 3}))
    d2.train()
    assert d2.step == 3 and losses(d2.history)[:2] == losses(history)


def test_prompt_bank_validation():
    with pytest.raises(ValueError, match="same number of prompts"):
        PromptBank({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="batch 1"):
        PromptBank({"a": torch.zeros(3, 2)}, {"a": torch.zeros(2, 2)})
    bank = PromptBank({"a": torch.arange(5.0)[:, None]}, {"a": torch.full((1, 1), -1.0)})
    cond, uncond, idx = bank(4, torch.Generator().manual_seed(0))
    assert torch.equal(cond["a"][:, 0], idx.float()) and torch.equal(uncond["a"], torch.full((4, 1), -1.0))


def test_load_unet_weights_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    src, dst = tiny_unet(seed=0), tiny_unet(seed=1)
    path = str(tmp_path / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    load_unet_weights(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
    prefixed = str(tmp_path / "prefixed.safetensors")
    save_file({f"unet.{k}": v.contiguous() for k, v in src.state_dict().items()}, prefixed)
    load_unet_weights(tiny_unet(seed=2), prefixed)
    with pytest.raises(ValueError, match="does not fit"):
        load_unet_weights(tiny_unet(block_out_channels=(8, 24)), path)
    with pytest.raises(FileNotFoundError):
        load_unet_weights(dst, str(tmp_path / "missing.safetensors"))


def test_checkpoint_reader_and_tensor_walk_have_public_names():
    """read_checkpoint / walk_tensors are distiller's public names for what pipeline.py (and distill_cli) used to
    import as _read_checkpoint / _walk; the old private names stay as the same objects, and pipeline.py imports no
    private name from the distiller."""
    import ast
    import pathlib

    from nitrokernels.nitro import distiller, pipeline

    assert distiller.read_checkpoint is distiller._read_checkpoint and distiller.walk_tensors is distiller._walk
    assert {"read_checkpoint", "walk_tensors"} <= set(distiller.__all__)
    t, u = torch.zeros(2), torch.ones(1)
    walked = list(distiller.walk_tensors({"a": t, "added_cond_kwargs": {"time_ids": u, "note": "x"}}))
    assert [k for k, _ in walked] == ["a", "added_cond_kwargs.time_ids"] and walked[1][1] is u
    tree = ast.parse(pathlib.Path(pipeline.__file__).read_text())
    private = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module == "nitrokernels.nitro.distiller" for alias in node.names if alias.name.startswith("_")]
    assert not private, f"pipeline.py imports private distiller names {private}"


def test_save_image_grid(tmp_path):
    from PIL import Image

    path = save_image_grid(torch.rand(12, 1, 16, 16) * 2 - 1, str(tmp_path / "g.png"), nrow=5, scale=2)
    img = Image.open(path)
    assert img.size == ((5 * 17 + 1) * 2, (3 * 17 + 1) * 2)
    save_image_grid(torch.rand(3, 4, 8, 8), str(tmp_path / "latents.png"))
