"""Checkpoints as untrusted files (issue 12).

* an untrusted checkpoint cannot run code: torch.load(weights_only=True) for every state it holds; a pickled
  object whose __reduce__ would write a marker file is refused and the marker never appears; files of the older
  format that needed unpickling are refused with a message, and convert_legacy_checkpoint converts trusted ones;
* every value is covered by a sha256 digest: edited tensors and flipped bytes are detected;
* everything is validated before anything is modified: a missing key, a wrong-shape optimiser state, a bad RNG
  state leave student, EMA, heads, optimisers and step untouched;
* kill-resume: log.jsonl has no repeated steps after a resume, the dead writer's checkpoint.pt.tmp-<pid> is removed;
* UNet safetensors written here carry a sha256 that load_unet_weights verifies; expected_sha256= for others' files.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from nitrokernels.digits import data as digits
from nitrokernels.nitro.distiller import (CHECKPOINT_FORMAT, CheckpointError, DistillConfig, NitroDistiller,
                                          PromptBank, convert_legacy_checkpoint, state_digest)

DISC = dict(pool_sizes=2, hidden=16, num_groups=4, local_size=4, head_backend="eager", t_star_sampled=1,
            refresh_min_updates=0)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return digits.make_digits_unet(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                   attention_head_dim=4)


def tiny_bank():
    torch.manual_seed(1)
    enc = digits.DigitsEncoder(dim=8)
    with torch.no_grad():
        return PromptBank({"encoder_hidden_states": enc(torch.arange(10))}, {"encoder_hidden_states": enc.empty(1)})


def make(**overrides):
    teacher = tiny_unet()
    config = DistillConfig(**{**dict(steps=2, batch_size=2, teacher_steps=2, lr_student=1e-3, lr_heads=1e-3,
                                     progress=False, log_every=1, device="cpu", discriminator=DISC), **overrides})
    return NitroDistiller(teacher, copy.deepcopy(teacher), digits.make_teacher_scheduler(), tiny_bank(), config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(path of a good 2-step checkpoint, its bytes)."""
    out = tmp_path_factory.mktemp("ckpt")
    make(out_dir=str(out), ema_decay=0.9).train()
    path = out / "checkpoint.pt"
    return path, path.read_bytes()


def snapshot(d):
    return copy.deepcopy({"student": d.student.state_dict(), "ema": d.ema.state_dict() if d.ema else None,
                          "heads": d.disc.heads_state_dict(), "opt_student": d.opt_student.state_dict(),
                          "opt_heads": d.opt_heads.state_dict(), "step": d.step,
                          "host": d.host_gen.get_state()})


def assert_same(a, b):
    def walk(x, y, where):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        else:
            assert x == y, where
    walk(a, b, "state")


def rewrite(src, dst, edit, redigest=True):
    state = torch.load(src, weights_only=True)
    edit(state)
    if redigest:
        state["digest"] = state_digest(state)
    torch.save(state, dst)


# ------------------------------------------------------------------------------------------ no code runs
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_pickled_object_in_a_checkpoint_does_not_run(tmp_path, trained):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    state = torch.load(trained[0], weights_only=True)
    state["history"] = [Exploit(str(marker))]
    torch.save(state, evil)
    fresh = make(ema_decay=0.9)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match="pickled Python objects.*refused"):
        fresh.load_checkpoint(str(evil))
    assert not marker.exists(), "loading an untrusted checkpoint ran code"
    assert_same(before, snapshot(fresh))
    # the exploit is real: unpickling it the old way runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_checkpoint_holds_only_weights_only_types(trained):
    state = torch.load(trained[0], weights_only=True)  # raises if anything needs unpickling
    assert state["format"] == CHECKPOINT_FORMAT and state["digest"] == state_digest(state)
    assert isinstance(state["config"], dict) and isinstance(state["rng"]["numpy"][1], torch.Tensor)


def test_legacy_checkpoint_is_refused_and_converts_when_trusted(tmp_path, trained):
    import numpy as np

    state = torch.load(trained[0], weights_only=True)
    state["format"] = "nitrokernels-nitrofusion-distill-v1"
    state.pop("digest")
    state["rng"]["numpy"] = np.random.get_state()  # what v1 stored: a tuple holding an ndarray
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy)
    fresh = make(ema_decay=0.9)
    with pytest.raises(CheckpointError, match="convert_legacy_checkpoint"):
        fresh.load_checkpoint(str(legacy))
    assert fresh.step == 0
    convert_legacy_checkpoint(str(legacy), str(tmp_path / "converted.pt"))
    fresh.load_checkpoint(str(tmp_path / "converted.pt"))
    assert fresh.step == 2


# ------------------------------------------------------------------------------------------ integrity
def test_flipped_bytes_inside_a_tensor_are_detected(tmp_path, trained):
    path, data = trained
    weight = torch.load(path, weights_only=True)["student"]["conv_in.weight"]
    raw = weight.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "tensor bytes not found in the file"
    bad = bytearray(data)
    bad[at + len(raw) // 2] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(bad))
    fresh = make(ema_decay=0.9)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match="corrupt"):
        fresh.load_checkpoint(str(tmp_path / "flipped.pt"))
    assert_same(before, snapshot(fresh))


def test_edited_values_fail_the_digest(tmp_path, trained):
    def edit(state):
        state["heads"][next(iter(state["heads"]))].add_(1e-3)

    rewrite(trained[0], tmp_path / "edited.pt", edit, redigest=False)
    with pytest.raises(CheckpointError, match="digest"):
        make(ema_decay=0.9).load_checkpoint(str(tmp_path / "edited.pt"))
    rewrite(trained[0], tmp_path / "step.pt", lambda s: s.__setitem__("step", 7), redigest=False)
    with pytest.raises(CheckpointError, match="digest"):
        make(ema_decay=0.9).load_checkpoint(str(tmp_path / "step.pt"))
    rewrite(trained[0], tmp_path / "nodigest.pt", lambda s: s.pop("digest"), redigest=False)
    with pytest.raises(CheckpointError, match="no digest"):
        make(ema_decay=0.9).load_checkpoint(str(tmp_path / "nodigest.pt"))


def _drop(*keys):
    def edit(state):
        target = state
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
    return edit


def _opt_state(name, key, fn):
    def edit(state):
        entry = next(iter(state[name]["state"].values()))
        entry[key] = fn(entry[key])
    return edit


@pytest.mark.parametrize("edit, match", [
    (_drop("opt_heads"), r"missing \['opt_heads'\]"),
    (_drop("scaler"), r"missing \['scaler'\]"),
    (_drop("rng", "numpy"), r"'rng' lacks \['numpy'\]"),
    (lambda s: s["heads"].pop([k for k in s["heads"] if not k.startswith("ages.")][0]), "'heads' keys differ"),
    (_drop("ema", "conv_in.weight"), "'ema' keys differ"),
    (_opt_state("opt_heads", "exp_avg", lambda t: t[:1]), "opt_heads' state 'exp_avg'"),
    (_opt_state("opt_heads", "step", lambda t: t[:1]), "opt_heads' state 'step'"),
    (_opt_state("opt_student", "exp_avg_sq", lambda t: t.reshape(-1)), "opt_student' state 'exp_avg_sq'"),
    (lambda s: s["opt_heads"]["param_groups"][0]["params"].pop(), "param groups of sizes"),
    (lambda s: s["rng"].__setitem__("host", torch.zeros(3, dtype=torch.uint8)), "invalid generator state"),
    (lambda s: s["student"].__setitem__("conv_in.bias", torch.zeros(3)), r"'student.conv_in.bias' is"),
    (lambda s: s["heads"].__setitem__(next(iter(s["heads"])), torch.zeros(1)), "'heads."),
    (lambda s: s.__setitem__("step", -1), "'step' must be an int"),
])
def test_bad_entries_are_refused_before_anything_is_modified(tmp_path, trained, edit, match):
    rewrite(trained[0], tmp_path / "bad.pt", edit)
    fresh = make(ema_decay=0.9)
    fresh.train(1)  # some state of its own, to see it kept
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=match):
        fresh.load_checkpoint(str(tmp_path / "bad.pt"))
    assert_same(before, snapshot(fresh))


# ------------------------------------------------------------------------------------------ kill-resume
class Killed(Exception):
    pass


def test_resume_after_a_kill_between_log_row_and_checkpoint_has_no_duplicate_rows(tmp_path):
    def die_at_4(step, result):
        if step == 4:
            raise Killed

    first = make(steps=4, out_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(Killed):
        first.train(callback=die_at_4)
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]  # row 3 written, its checkpoint (step 2) is older
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "d_lo')  # and a half-written row of a kill mid-write
    # a writer killed mid-checkpoint left its tmp file; a live writer's is kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"checkpoint.pt.tmp-{int(dead.stdout)}"
    live = tmp_path / f"checkpoint.pt.tmp-{os.getppid()}"
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    resumed = make(steps=4, out_dir=str(tmp_path), checkpoint_every=2)
    resumed.train()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert steps == [1, 2, 3, 4], steps
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    assert not stale.exists(), "the dead writer's tmp file was not removed"
    assert live.exists()
    live.unlink()


# ------------------------------------------------------------------------------------------ UNet safetensors
def _flip_inside(path, tensor):
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0
    data[at + len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def test_our_safetensors_carry_a_digest_that_is_verified(tmp_path):
    from nitrokernels.nitro.pipeline import UNetWeightsError, file_sha256, verify_safetensors

    unet = tiny_unet()
    enc = digits.DigitsEncoder(dim=8)
    path = tmp_path / "student.safetensors"
    digits.save_asset(str(path), {"unet": unet, "encoder": enc}, {"unet_config": {}})
    assert verify_safetensors(str(path)) is True
    groups, _ = digits.read_asset(str(path), expected_sha256=file_sha256(str(path)))
    assert set(groups) == {"unet", "encoder"}
    with pytest.raises(UNetWeightsError, match="does not match expected_sha256"):
        digits.read_asset(str(path), expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="64 hex digits"):
        digits.read_asset(str(path), expected_sha256="abc")
    _flip_inside(path, unet.state_dict()["conv_in.weight"].half())
    with pytest.raises(UNetWeightsError, match="corrupt"):
        digits.read_asset(str(path))
    with pytest.raises(UNetWeightsError, match="corrupt"):
        digits.load_pretrained_student(path=str(path))


def test_load_unet_weights_verifies_digest_and_expected_sha256(tmp_path):
    from safetensors.torch import save_file

    from nitrokernels.nitro.distiller import load_unet_weights
    from nitrokernels.nitro.pipeline import (SHA256_METADATA_KEY, UNetWeightsError, file_sha256,
                                             tensors_sha256)

    unet = tiny_unet()
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_file(state, str(ours), metadata={SHA256_METADATA_KEY: tensors_sha256(state)})
    save_file(state, str(theirs))  # someone else's file: no digest inside
    load_unet_weights(tiny_unet(1), str(ours))
    load_unet_weights(tiny_unet(1), str(theirs), expected_sha256=file_sha256(str(theirs)).upper())
    _flip_inside(ours, state["conv_in.weight"])
    _flip_inside(theirs, state["conv_in.weight"])
    target = tiny_unet(1)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(UNetWeightsError, match="corrupt"):
        load_unet_weights(target, str(ours))
    with pytest.raises(UNetWeightsError, match="does not match expected_sha256"):
        load_unet_weights(target, str(theirs), expected_sha256="ab" * 32)
    assert_same(before, target.state_dict())


KILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_checkpoint_safety import make
mode, out = sys.argv[1], sys.argv[2]
d = make(steps=4, out_dir=out, checkpoint_every=2)
if mode == "mid-run":
    def cb(step, result):
        if step == 4:  # row 3 is in log.jsonl, the checkpoint holds step 2
            os.kill(os.getpid(), signal.SIGKILL)
    d.train(callback=cb)
else:  # mid-write: the first checkpoint write dies half-way
    real = torch.save
    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
    d.train()
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("mode", ["mid-run", "mid-write"])
def test_sigkill_then_resume_gives_the_uninterrupted_run(tmp_path, mode):
    script = KILL_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    # the killed run must use this process's thread count: the resumed and reference runs below continue here,
    # and their losses are compared exactly (another count changes the float reduction order)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", script, mode, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert leftovers if mode == "mid-write" else not leftovers
    resumed = make(steps=4, out_dir=str(tmp_path), checkpoint_every=2)
    resumed.train()
    reference = make(steps=4)
    reference.train()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert steps == [1, 2, 3, 4], steps
    assert [(r["d_loss"], r["g_loss"]) for r in resumed.history] == \
        [(r["d_loss"], r["g_loss"]) for r in reference.history]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_shipped_assets_carry_a_verified_digest():
    """The package's own weight files carry the tensor digest save_asset writes, and it matches their tensors."""
    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.pipeline import verify_safetensors

    for name in (digits.TEACHER_ASSET, digits.STUDENT_ASSET, digits.CLASSIFIER_ASSET):
        assert verify_safetensors(digits.asset_path(name)) is True, name


def test_generate_unet_checkpoint_cannot_run_code(tmp_path, trained, capsys):
    """`nitrokernels generate --unet checkpoint.pt` and load_pipeline's read_unet_state read checkpoints with
    weights_only=True and their digest: a pickled exploit is refused (exit 2, one line) and never runs; an edited
    student tensor fails the digest."""
    from nitrokernels import cli
    from nitrokernels.nitro.pipeline import UNetWeightsError, read_unet_state

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    state = torch.load(trained[0], weights_only=True)
    state["history"] = [Exploit(str(marker))]
    torch.save(state, evil)
    assert cli.main(["generate", "--prompt", "7", "--unet", str(evil), "--device", "cpu", "--no-patch",
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "refused" in err and "Traceback" not in err
    assert not marker.exists(), "generate --unet ran code from an untrusted checkpoint"
    with pytest.raises(UNetWeightsError, match="pickled Python objects"):
        read_unet_state(evil)
    assert not marker.exists()
    rewrite(trained[0], tmp_path / "edited.pt", lambda s: s["student"]["conv_in.weight"].add_(1e-3), redigest=False)
    with pytest.raises(UNetWeightsError, match="corrupt"):
        read_unet_state(tmp_path / "edited.pt")
    state, info = read_unet_state(trained[0])            # the genuine file: the student's tensors
    assert info["source"] == "checkpoint" and torch.equal(state["conv_in.weight"],
                                                          torch.load(trained[0], weights_only=True)["student"]["conv_in.weight"])
