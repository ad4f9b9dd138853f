"""train.py: the RL math (losses, advantages), then whole runs at tiny settings: outputs, resume, bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from nanoddpo import rewards
from nanoddpo.ddim import log_prob_of_step, sample, DDIM
from nanoddpo.model import StableDiffusion
from nanoddpo.prompts import draw_prompts


def settings(**kw):
    return train.Settings(**{**train.PRESETS["tiny"], **kw})


# --- the losses ---------------------------------------------------------------------------------------------------

def grad_of(loss_fn, log_prob, old, adv):
    log_prob = log_prob.clone().requires_grad_(True)
    loss_fn(log_prob, old, adv).backward()
    return log_prob.grad


def test_clipped_objective_has_reinforce_gradient_at_ratio_one():
    torch.manual_seed(0)
    old, adv = torch.randn(6), torch.randn(6)
    ppo = lambda lp, o, a: train.policy_loss(settings(algo="ppo"), lp, o, a)[0]
    reinforce = lambda lp, o, a: train.policy_loss(settings(algo="reinforce"), lp, o, a)[0]
    g_ppo, g_sf = grad_of(ppo, old, old, adv), grad_of(reinforce, old, old, adv)
    assert torch.allclose(g_ppo, g_sf, atol=1e-7) and torch.allclose(g_sf, -adv / 6)


def test_clipping_engages_outside_the_clip_range():
    s = settings(clip_range=1e-4)
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1 + 5e-4, 1 + 5e-4, 1 - 5e-4, 1 - 5e-4]))  # ratios outside 1 +- 1e-4
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    grad = grad_of(lambda lp, o, a: train.policy_loss(s, lp, o, a)[0], log_prob, old, adv)
    # Ratio above the range with A > 0, or below it with A < 0: the clipped term wins and the gradient is zero.
    assert grad[0] == 0 and grad[3] == 0
    # The other two move the policy back toward the range, so they keep their gradient.
    assert grad[1] != 0 and grad[2] != 0
    _, _, clipfrac = train.policy_loss(s, log_prob, old, adv)
    assert clipfrac == 1.0


# --- the epoch's prompts ------------------------------------------------------------------------------------------

def test_prompts_are_drawn_evenly_and_in_groups():
    prompts = [f"p{i}" for i in range(10)]
    gen = torch.Generator().manual_seed(0)
    drawn = draw_prompts(prompts, 40, 4, gen)  # 10 prompts x 4 images: every prompt exactly 4 times
    assert len(drawn) == 40 and all(drawn.count(p) == 4 for p in prompts)
    assert drawn != sorted(drawn)  # shuffled, so a sampling batch mixes prompts
    drawn = draw_prompts(prompts, 24, 4, gen)  # 6 groups of 4 from one pass: 6 distinct prompts
    assert sorted(drawn.count(p) for p in set(drawn)) == [4] * 6
    drawn = draw_prompts(prompts, 25, 1, gen)  # 2.5 passes: every prompt 2 or 3 times, never 1 or 4
    assert {drawn.count(p) for p in prompts} <= {2, 3}


# --- advantages ---------------------------------------------------------------------------------------------------

def test_per_prompt_stats_use_the_batch_until_min_count_then_the_buffer():
    tracker = train.PerPromptStatTracker(buffer_size=4, min_count=3)
    rewards = np.array([1.0, 2.0, 10.0, 20.0])
    adv = tracker.advantages(["a", "a", "b", "b"], rewards)  # 2 < 3 rewards each: batch statistics
    assert np.allclose(adv, (rewards - rewards.mean()) / (rewards.std() + 1e-6))
    adv = tracker.advantages(["a", "a", "b", "b"], np.array([3.0, 4.0, 30.0, 40.0]))  # 4 each: own buffers
    assert np.allclose(adv[:2], (np.array([3, 4]) - 2.5) / (np.std([1, 2, 3, 4]) + 1e-6))
    tracker.advantages(["a"], np.array([5.0]))
    assert tracker.buffers["a"] == [2.0, 3.0, 4.0, 5.0]  # capped at buffer_size, oldest out


def test_advantages_are_clipped():
    rewards = np.array([0.0] * 99 + [100.0])
    adv = train.compute_advantages(settings(per_prompt_stats=False, adv_clip_max=5), None, ["p"] * 100, rewards)
    assert adv.max() == 5.0 and adv.min() < 0


# --- the stored trajectory is scored exactly as it was sampled: ratio 1 on the first update --------------------------

def test_recomputed_log_probs_match_sampling(tiny_model_dir):
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    traj = sample(sd, ["a red cat", "cat"], seeds=[1, 2], num_steps=4, guidance_scale=5.0)
    ddim = DDIM(4)
    for j in range(4):
        t = ddim.timesteps[j].repeat(2)
        lp = log_prob_of_step(sd.unet, ddim, traj.latents[:, j], traj.latents[:, j + 1], t, traj.context,
                              traj.negative_context, 5.0)
        assert torch.allclose(lp, traj.log_probs[:, j], atol=1e-5)


# --- whole runs ---------------------------------------------------------------------------------------------------

TINY_RUN = dict(prompts="simple_animals", num_steps=3, batch_size=4, batches_per_epoch=2, train_batch_size=4,
                grad_accum=1, timestep_fraction=1.0, clip_range=1e-4, save_every=1, grid_every=1, stat_min_count=2)


def run(tmp_path, tiny_model_dir, **kw):
    s = settings(model=str(tiny_model_dir), out_dir=str(tmp_path), **{**TINY_RUN, **kw})
    train.main(s, None)
    return tmp_path / s.name


@pytest.mark.parametrize("algo,lora", [("ppo", False), ("reinforce", True)])
def test_run_writes_metrics_grids_and_checkpoints(tmp_path, tiny_model_dir, algo, lora):
    run_dir = run(tmp_path, tiny_model_dir, name="r", algo=algo, lora=lora, epochs=2)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "sample_s", "reward_s", "train_s", "images_per_s"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    steps_per_epoch = 1 if algo == "reinforce" else 2
    assert metrics[-1]["global_step"] == 2 * steps_per_epoch
    ckpt = run_dir / "checkpoints" / f"step_{2 * steps_per_epoch}"
    weights = load_file(ckpt / ("lora.safetensors" if lora else "unet.safetensors"))
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    if lora:
        assert all(".lora_" in k for k in weights) and len(weights) > 0
    else:
        assert set(weights) == set(base)  # the published key names: drops in where the original file does
        assert any(not torch.equal(weights[k], base[k]) for k in base)  # and it trained
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 2 and state["settings"]["algo"] == algo
    assert (run_dir / "samples_epoch0001.png").is_file()


def test_resume_continues_exactly(tmp_path, tiny_model_dir):
    straight = run(tmp_path / "a", tiny_model_dir, name="r", epochs=2)
    interrupted = run(tmp_path / "b", tiny_model_dir, name="r", epochs=1)
    s, ckpt = train.parse_settings(["--resume", str(interrupted), "--epochs", "2"])
    train.main(s, ckpt)
    a = load_file(straight / "checkpoints" / "step_4" / "unet.safetensors")
    b = load_file(interrupted / "checkpoints" / "step_4" / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1]


def test_nan_rewards_are_dropped_with_a_warning(tmp_path, tiny_model_dir, monkeypatch):
    def half_nan(images, prompts):
        r = rewards.jpeg_compressibility(images)
        r[::2] = np.nan
        return r
    monkeypatch.setitem(rewards.REWARDS, "half-nan", lambda: half_nan)
    monkeypatch.setitem(train.REWARDS, "half-nan", lambda: half_nan)
    with pytest.warns(UserWarning, match="NaN/inf reward"):
        run_dir = run(tmp_path, tiny_model_dir, name="r", reward="half-nan", epochs=1, train_batch_size=2)
    m = json.loads((run_dir / "metrics.jsonl").read_text())
    assert m["samples"] == 4 and np.isfinite(m["reward_mean"]) and np.isfinite(m["loss"])


def cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--reward", "beauty"], "unknown reward 'beauty'; choose one of: jpeg, jpeg-incompressibility"),
    (["--algo", "dpo"], "unknown algorithm 'dpo'; choose one of: ppo, reinforce"),
    (["--batch-size", "5", "--batches-per-epoch", "1", "--train-batch-size", "2"], "is not divisible by --train-batch-size 2"),
    (["--batch-size", "6", "--batches-per-epoch", "1", "--train-batch-size", "2", "--grad-accum", "1",
      "--images-per-prompt", "4"],
     "--images-per-prompt 4 must be at least 1 and divide the samples per epoch (6)"),
    (["--images-per-prompt", "0"], "--images-per-prompt 0 must be at least 1"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
])
def test_bad_settings_fail_clearly(args, message):
    out = cli(*args)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_unwritable_output_and_empty_resume(tmp_path, tiny_model_dir):
    (tmp_path / "file").write_text("not a folder")
    out = cli("--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "file"))
    assert out.returncode != 0 and "cannot write to" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "empty").mkdir()
    out = cli("--resume", str(tmp_path / "empty"))
    assert out.returncode != 0 and "no checkpoint" in out.stderr and "Traceback" not in out.stderr


# --- RWR baselines ------------------------------------------------------------------------------------------------

def test_rwr_weights():
    rewards = np.array([0.0, 1.0, 2.0, np.nan, 3.0] + [0.5] * 15)
    w = train.compute_advantages(settings(algo="rwr", rwr_beta=0.2), None, ["p"] * 20, rewards)
    finite = np.isfinite(rewards)
    assert w[~finite] == 0 and np.isclose(w[finite].mean(), 1.0) and w.argmax() == 4
    assert np.isclose(w[4] / w[2], np.exp(1 / 0.2))  # softmax(r / beta): one more reward is e^5 more weight
    top = train.compute_advantages(settings(algo="rwr-sparse", rwr_top_fraction=0.1), None, ["p"] * 20, rewards)
    assert sorted(np.flatnonzero(top)) == [2, 4] and set(top) == {0.0, 1.0}  # the best 10% of 19 finite rewards


@pytest.mark.parametrize("algo", ["rwr", "rwr-sparse"])
def test_rwr_runs(tmp_path, tiny_model_dir, algo):
    run_dir = run(tmp_path, tiny_model_dir, name="r", algo=algo, epochs=1)
    m = json.loads((run_dir / "metrics.jsonl").read_text())
    assert m["global_step"] == 2 and np.isfinite(m["loss"]) and m["loss"] > 0


# --- data parallel: two processes on CPU with gloo ------------------------------------------------------------------

def ddp_worker(rank, world, port, out, model_dir, kw):
    import os
    from nanoddpo.model import save_safetensors
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    if "resume" in kw:  # continue a run under torchrun, as `torchrun ... train.py --resume runs/x --epochs N` does
        sd = train.main(*train.parse_settings(["--resume", kw["resume"], "--epochs", str(kw["epochs"])]))
    else:
        sd = train.main(settings(model=model_dir, out_dir=out, **kw), None)
    save_safetensors(sd.unet.state_dict(), f"{out}/rank{rank}.safetensors")


def test_two_processes_train_as_one(tmp_path, tiny_model_dir):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Adam's first step is lr * g / (|g| + eps): with eps >> |g| it is linear in the gradient, so float rounding in
    # gradients near zero cannot flip the sign of a whole lr-sized step and the comparison below is meaningful.
    kw = {**TINY_RUN, "name": "ddp", "batches_per_epoch": 1, "train_batch_size": 4, "epochs": 2, "lr": 1.0, "adam_eps": 1.0}
    mp.spawn(ddp_worker, args=(2, port, str(tmp_path / "ddp"), str(tiny_model_dir), kw), nprocs=2)
    r0, r1 = (load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # (a) the ranks never drift apart
    # --resume under torchrun: 1 epoch, then resume to 2, lands exactly where the uninterrupted run did
    mp.spawn(ddp_worker, args=(2, port + 2, str(tmp_path / "cut"), str(tiny_model_dir), {**kw, "epochs": 1}), nprocs=2)
    resumed = {"resume": str(tmp_path / "cut" / "ddp"), "epochs": 2}
    mp.spawn(ddp_worker, args=(2, port + 3, str(tmp_path / "cut"), str(tiny_model_dir), resumed), nprocs=2)
    again = load_file(tmp_path / "cut" / "rank0.safetensors")
    assert all(torch.equal(r0[k], again[k]) for k in r0)
    # (b) one epoch (one optimizer step) of 2 x 4 samples equals one process with the same 8 samples
    mp.spawn(ddp_worker, args=(2, port + 1, str(tmp_path / "one"), str(tiny_model_dir), {**kw, "epochs": 1}), nprocs=2)
    single = run(tmp_path / "single", tiny_model_dir, **{**kw, "epochs": 1, "batch_size": 8, "train_batch_size": 8})
    ddp = load_file(tmp_path / "one" / "rank0.safetensors")
    ref = load_file(single / "checkpoints" / "step_1" / "unet.safetensors")
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    update_ddp, update_ref = (torch.cat([(w[k] - base[k]).flatten() for k in base]) for w in (ddp, ref))
    assert update_ref.abs().max() > 1e-4
    # Equal up to float32 rounding of the weights themselves (an update of 1e-3 on a weight of 1 keeps ~4 digits).
    assert (update_ddp - update_ref).norm() / update_ref.norm() < 1e-4


def test_plot_draws_one_curve_per_run(tmp_path):
    from nanoddpo.plot import COLOURS, plot, read_curve
    for name, rewards in (("a", [1.0, 2.0, 3.0]), ("b", [3.0, 2.0, 1.0])):
        (tmp_path / name).mkdir()
        lines = [json.dumps(dict(epoch=i, samples=64, reward_mean=r)) for i, r in enumerate(rewards)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert read_curve(tmp_path / "a") == ([64, 128, 192], [1.0, 2.0, 3.0])
    img = plot({n: read_curve(tmp_path / n) for n in "ab"})
    colours = {c for _, c in img.getcolors(1 << 20)}
    for hexcode in COLOURS[:2]:
        assert tuple(int(hexcode[i : i + 2], 16) for i in (1, 3, 5)) in colours
