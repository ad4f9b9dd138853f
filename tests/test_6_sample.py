"""
Smoke tests of sample.py, run as a script on a tiny random model: the checkpoint grid end to end, and bad inputs
failing with one clear line instead of a traceback.

    python -m pytest -x -q tests/test_6_sample.py
"""
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanoddpo.cli import UsageError
from nanoddpo.model import StableDiffusion, save_safetensors

SAMPLE = Path(__file__).resolve().parent.parent / "sample.py"
CELL, LEFT, LINE = 128, 110, 14  # grid geometry of sample.py: image cells, row-label margin, text line


def run_sample(*args, cwd):
    # One thread: the tiny model gains nothing from more, and on a busy machine OpenMP threads that spin waiting for a
    # core made these runs up to 100x slower (measured on a shared 2-core machine: 13 s instead of 0.13 s to sample).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SAMPLE), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def write_checkpoint(folder, unet_state, fingerprint):
    folder.mkdir(parents=True)
    save_safetensors(unet_state, folder / "unet.safetensors")
    (folder / "state.json").write_text(json.dumps({"base_model": "tiny", "base_fingerprint": fingerprint, "settings": {}}))
    return folder


@pytest.fixture(scope="module")
def workdir(tiny_model_dir, tmp_path_factory):
    """A working folder with runs/demo/checkpoints/step_1 (the base UNet unchanged) and step_2 (perturbed)."""
    root = tmp_path_factory.mktemp("sample")
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    state = sd.unet.state_dict()
    write_checkpoint(root / "runs/demo/checkpoints/step_1", state, sd.fingerprint)
    torch.manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    write_checkpoint(root / "runs/demo/checkpoints/step_2", perturbed, sd.fingerprint)
    return root


def cell(png, row, column, rows_have_rewards=True, header_lines=1):
    top = LINE * header_lines + row * (CELL + (LINE if rows_have_rewards else 0))
    return np.asarray(png)[top:top + CELL, LEFT + column * CELL:LEFT + (column + 1) * CELL]


def test_default_compares_base_with_latest_checkpoint(workdir, tiny_model_dir):
    model = workdir / "model"  # the tiny model plus a prompts.json, as weights/tiny ships it
    shutil.copytree(tiny_model_dir, model)
    prompts = [f"a cat number {i}" for i in range(8)]
    prompts[2] = "a cat " * 60  # 120 words: more than 77 tokens
    (model / "prompts.json").write_text(json.dumps(prompts))
    out = run_sample("--model", model, "--steps", 2, "--reward", "jpeg", "--per-prompt", 2, "--out", "grid.png",
                     cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"base model: {model}"
    assert "truncated" in out.stderr  # the long prompt is cut to 77 tokens with a warning, not an error
    assert "base: mean jpeg reward" in out.stdout
    assert "runs/demo/checkpoints/step_2: mean jpeg reward" in out.stdout  # the latest checkpoint, not step_1
    png = Image.open(workdir / "grid.png")
    # 4 of the 8 prompts x 2 seeds; 2 rows; the long prompt's label wraps onto the 3 lines a header may take
    assert png.size == (LEFT + 4 * 2 * CELL, 3 * LINE + 2 * (CELL + LINE))
    assert not np.array_equal(cell(png, 0, 0, header_lines=3), cell(png, 1, 0, header_lines=3))  # checkpoint applied
    assert not np.array_equal(cell(png, 0, 0, header_lines=3), cell(png, 0, 1, header_lines=3))  # seeds 0, 1 differ


def load_sample_script():
    spec = importlib.util.spec_from_file_location("sample_script", SAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_explicit_checkpoints_share_seeds(workdir, tiny_model_dir, monkeypatch):
    """step_1 holds the base UNet unchanged, so its row must repeat the base row exactly: same prompts, same seeds.
    Run in-process (sample.py's main) to keep the suite fast; the subprocess tests above cover the script's shell."""
    monkeypatch.chdir(workdir)
    script = load_sample_script()
    script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "2", "--ckpt", "base",
                                          "runs/demo/checkpoints/step_1", "runs/demo", "--prompts", "a cat", "a dog",
                                          "--out", "explicit.png"]))
    png = Image.open(workdir / "explicit.png")
    assert png.size == (LEFT + 2 * CELL, LINE + 3 * CELL)
    for column in range(2):
        assert np.array_equal(cell(png, 0, column, False), cell(png, 1, column, False))
        assert not np.array_equal(cell(png, 0, column, False), cell(png, 2, column, False))  # a run = its latest


def test_images_do_not_depend_on_the_batch_size(workdir, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(workdir)
    script = load_sample_script()
    grids = []
    for batch in ("1", "4", "8"):  # 6 images: 6 batches of 1, a batch of 4 and one of 2, one batch of 6
        script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "2", "--ckpt", "base",
                                              "--prompts", "a cat", "a dog", "a red cat", "--per-prompt", "2",
                                              "--batch-size", batch, "--out", f"batch{batch}.png"]))
        grids.append(np.asarray(Image.open(workdir / f"batch{batch}.png")).astype(int))
    assert grids[0].shape == (LINE + CELL, LEFT + 6 * CELL, 3)
    assert all(np.abs(g - grids[0]).max() <= 1 and (g != grids[0]).mean() < 1e-3 for g in grids[1:])  # float rounding


def test_defaults_are_what_the_checkpoints_were_trained_with(tmp_path, tiny_model_dir, capsys):
    script = load_sample_script()
    for name, steps, eta, base in [("a", 10, 0.5, tiny_model_dir), ("b", 10, 0.5, tiny_model_dir), ("c", 20, 1.0, "x")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps({"base_model": str(base), "settings": {
            "num_steps": steps, "eta": eta, "guidance_scale": 3.0}}))
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert script.trained(["base", a, b], "num_steps", 50) == 10  # a tiny-preset run is compared at its 10 steps
    assert script.trained(["base", a, b], "eta", 1.0) == 0.5  # and a policy trained at eta 0.5 at eta 0.5
    assert script.trained(["base", a, b], "base_model", None) == str(tiny_model_dir)  # on the model it started from
    assert script.trained(["base"], "num_steps", 50) == 50 and script.trained([a, c], "eta", 1.0) == 1.0  # no agreement
    etas = []  # and they reach the sampler, without --model, --steps, --eta or --guidance (the guided eps is the policy)
    def recording(sd, prompts, seeds, **kw):
        etas.append((sd.path, kw["num_steps"], kw["eta"], kw["guidance_scale"]))
        raise SystemExit(0)
    script.sample = recording
    for given in ([], ["--eta", "0"], ["--guidance", "7"]):
        with pytest.raises(SystemExit):
            script.main(script.parser.parse_args(["--ckpt", "base", a, "--out", str(tmp_path / "x.png"), *given]))
    assert etas == [(str(tiny_model_dir), 10, 0.5, 3.0), (str(tiny_model_dir), 10, 0.0, 3.0),
                    (str(tiny_model_dir), 10, 0.5, 7.0)]


def test_rows_are_scored_with_the_reward_the_checkpoints_learned(workdir, tiny_model_dir, tmp_path, monkeypatch,
                                                                 capsys):
    """Without --reward, the rows are scored with the reward the checkpoints were trained on (their settings), paired
    against the base; --reward none scores nothing; checkpoints that disagree choose none; and a reward of theirs that
    cannot score here (its file since moved) is one line, and the grid is still drawn."""
    monkeypatch.chdir(tmp_path)
    script = load_sample_script()
    for run, reward in [("jpeg_run", "jpeg"), ("moved_run", "gone.py:score")]:
        folder = tmp_path / run / "checkpoints" / "step_1"
        shutil.copytree(workdir / "runs/demo/checkpoints/step_2", folder)
        state = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps({**state, "settings": {"reward": reward}}))

    def main(*args):
        script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "2", "--prompts", "a cat",
                                              "--per-prompt", "2", "--out", "scored.png", "--ckpt", *args]))
        return capsys.readouterr().out

    out = main("base", "jpeg_run")
    assert "reward: jpeg, as the checkpoints were trained" in out
    assert "base: mean jpeg reward" in out and "paired against base" in out.split("jpeg_run/checkpoints/step_1: ")[1]
    scored = main("base", "jpeg_run", "--reward", "jpeg-incompressibility")  # a reward given replaces theirs
    assert "mean jpeg-incompressibility reward" in scored and "mean jpeg reward" not in scored
    assert "wrote scored.png, the jpeg-incompressibility reward under each image" in scored  # the grid's numbers
    drawn, draw = [], script.grid  # with two rewards, the grid's numbers are the first's, row by row, not the last's
    monkeypatch.setattr(script, "grid", lambda *a: drawn.append(a[3]) or draw(*a))
    two = main("base", "jpeg_run", "--reward", "jpeg-incompressibility", "jpeg", "--scores", "scores.json")
    assert "the jpeg-incompressibility reward under each image" in two
    every = json.loads(Path("scores.json").read_text())["scores"]
    assert [list(r) for r in drawn[0]] == list(every["jpeg-incompressibility"].values()) != list(every["jpeg"].values())
    assert list(every["jpeg"])[0] == "base" and len(drawn[0]) == 2  # one row a checkpoint, in --ckpt order
    for args in [("base", "jpeg_run", "--reward", "none"), ("base", "jpeg_run", "moved_run"), ("base",)]:
        assert "mean" not in (out := main(*args)) and "wrote scored.png\n" in out
    out = main("base", "moved_run")
    assert "not scored with gone.py:score, the checkpoints' reward: " in out and "wrote scored.png" in out


def test_default_prompts_are_those_the_checkpoints_learned_on(tmp_path, tiny_model_dir, capsys):
    """An SD run on imagenet_animals is compared on 4 of those animals, not on the model's own prompts; a run on the
    model's own prompts ("") on those; and a run whose prompt file has since moved, on the model's, with a line."""
    from nanoddpo.prompts import imagenet_animals
    model, own = tmp_path / "model", [f"a cat number {i}" for i in range(8)]
    shutil.copytree(tiny_model_dir, model)
    (model / "prompts.json").write_text(json.dumps(own))
    script = load_sample_script()
    drawn = []
    def recording(sd, prompts, seeds, **kw):
        drawn.append(prompts)
        raise SystemExit(0)
    script.sample = recording
    for name, spec in [("set", "imagenet_animals"), ("own", ""), ("moved", str(tmp_path / "gone.txt"))]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps({"settings": {"prompts": spec}}))
        with pytest.raises(SystemExit):
            script.main(script.parser.parse_args(["--model", str(model), "--ckpt", "base", str(tmp_path / name),
                                                  "--out", str(tmp_path / "x.png")]))
    assert drawn[0] == imagenet_animals()[::99][:4]  # tench, goose, standard schnauzer, sloth bear: 4 of the 398
    assert drawn[1] == drawn[2] == ["a cat number 0", "a cat number 2", "a cat number 4", "a cat number 6"]
    assert f"not the checkpoints' prompts: prompts '{tmp_path / 'gone.txt'}' is neither a file" in capsys.readouterr().out


def test_checkpoint_of_another_base_model_is_refused(workdir, tiny_model_dir):
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    state = sd.unet.state_dict()
    state["conv_in.weight"] = torch.zeros(16, *state["conv_in.weight"].shape[1:])  # a narrower UNet
    # outside runs/, so that the default run of the test above always finds runs/demo as the newest run
    write_checkpoint(workdir / "elsewhere/other/checkpoints/step_1", state, "0123456789abcdef")
    out = run_sample("--model", tiny_model_dir, "--steps", 1, "--ckpt", "elsewhere/other", cwd=workdir)
    assert out.returncode != 0
    assert "trained on a different base model" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_base_model_that_moved_is_one_line_that_says_to_pass_model(workdir, command_line, monkeypatch):
    monkeypatch.chdir(workdir)  # runs/demo's checkpoints were trained on "tiny", which is not in workdir
    status, err = command_line(str(SAMPLE), ["--ckpt", "runs/demo", "--steps", "1"])
    assert status == 1 and err.strip() == ("sample.py: error: the checkpoints were trained on tiny, which is not there: "
                                           "pass --model with where it is now")


def test_damaged_checkpoint_is_one_line_that_names_it(workdir, tiny_model_dir, command_line):
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    damaged = write_checkpoint(workdir / "elsewhere/damaged/checkpoints/step_1", sd.unet.state_dict(), sd.fingerprint)
    data = (damaged / "unet.safetensors").read_bytes()
    (damaged / "unet.safetensors").write_bytes(data[: len(data) // 2])  # a copy cut short
    args = ["--model", tiny_model_dir, "--steps", 1, "--ckpt", damaged, "--out", workdir / "damaged.png"]
    status, err = command_line("sample.py", args)
    assert status == 1 and err.startswith(f"sample.py: error: checkpoint {damaged} cannot be read ("), err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    (damaged / "state.json").write_text("{")
    status, err = command_line("sample.py", args[:2] + ["--ckpt", damaged, "--out", workdir / "damaged.png"])
    assert status == 1 and "cannot be read (JSONDecodeError" in err and err.strip().count("\n") == 0, err


BAD_FLAGS = [  # each refused in one line before any model loads
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--steps", "many"], "--steps: many: expected a whole number"),
    (["--steps", "1001"], "--steps 1001: must be at most 1000 (the schedule's training steps)"),
    (["--eta", "1.5"], "--eta 1.5: must be in [0, 1]"),
    (["--guidance", "inf"], "--guidance: inf: expected a finite number"),
    (["--guidance", "1e400"], "--guidance: 1e400: expected a finite number"),  # overflows to inf
    (["--guidance", "-1"], "--guidance -1.0: must be 0 or more"),
    (["--per-prompt", "0"], "--per-prompt 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--seeds", "3", "-1"], "--seeds [3, -1]: must be 0 or more"),
    (["--seeds", str(2**64)], f"--seeds [{2**64}]: must be 0 or more and below 2**63"),
    # where the grid and the scores go is checked now, not after every image is sampled
    (["--out", "grid.gif"], "--out grid.gif: must end in .png, .jpg, .jpeg, .webp"),
    (["--out", "runs/demo/checkpoints/step_1/state.json/grid.png"], "step_1/state.json is a file, not a folder"),
    (["--scores", "runs"], "--scores runs: must end in .json"),
    (["--scores", "runs/demo/checkpoints/step_1/state.json/s.json"], "step_1/state.json is a file, not a folder"),
    (["--device", "tpu"], "--device tpu: choose auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:9"], "--device cuda:9: no such GPU"),
    (["--model", "no/such/model"], "no/such/model does not exist"),
    (["--ckpt", "runs/nope"], "--ckpt runs/nope: no such checkpoint or run folder"),
    (["--ckpt", "base", "runs/demo/checkpoints"], "--ckpt runs/demo/checkpoints: holds no checkpoint: give a run folder"),
    (["--reward", "beauty"], "--reward beauty: choose one of jpeg, jpeg-incompressibility"),  # as train.py says
    (["--reward", "none", "jpeg"], "--reward none jpeg: none stands alone: no scores"),
    (["--reward", "jpeg", "none"], "--reward jpeg none: none stands alone: no scores"),  # not only the first
    (["--reward", "tinyworld", "--prompts", "a cat"], "1 of 1 prompts are not, e.g. 'a cat'"),
]


@pytest.mark.parametrize("args, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_exit_with_one_clear_line(workdir, tiny_model_dir, args, message, command_line, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    status, err = command_line(str(SAMPLE), ["--model", tiny_model_dir, *args])
    assert status == 1 and message in err and "Traceback" not in err, err
    assert err.startswith("sample.py: error: ") and err.strip().count("\n") == 0


def test_only_step_folders_are_checkpoints(tmp_path):
    """A user's step_final folder or a file named step_7 beside the checkpoints is neither read nor sorted by int():
    it broke sample.py's default run and train.py --resume."""
    from nanoddpo.checkpoint import checkpoints_of, latest_run_checkpoint

    ckpts = tmp_path / "runs/r/checkpoints"
    for name in ("step_10", "step_2", "step_final", ".tmp_step_11"):
        (ckpts / name).mkdir(parents=True)
    (ckpts / "step_7").write_text("notes")
    assert checkpoints_of(tmp_path / "runs/r") == [ckpts / "step_2", ckpts / "step_10"]
    assert latest_run_checkpoint(tmp_path / "runs") == ckpts / "step_10"


def test_lora_checkpoint_row(workdir, tiny_model_dir, monkeypatch):
    """A LoRA checkpoint as train.py writes it (lora.safetensors beside state.json) gets its own, different row."""
    from nanoddpo.lora import add_lora, lora_state_dict

    trained = StableDiffusion.from_pretrained(tiny_model_dir)
    add_lora(trained.unet, rank=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # B starts at zero; a trained LoRA has moved it
    ckpt = workdir / "elsewhere/lora/checkpoints/step_3"
    ckpt.mkdir(parents=True)
    save_safetensors(lora_state_dict(trained.unet), ckpt / "lora.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"base_fingerprint": trained.fingerprint}))

    monkeypatch.chdir(workdir)
    script = load_sample_script()
    script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "2", "--ckpt", "base", str(ckpt),
                                          "--prompts", "a cat", "--out", "lora.png"]))
    png = Image.open(workdir / "lora.png")
    assert png.size == (LEFT + CELL, LINE + 2 * CELL)
    assert not np.array_equal(cell(png, 0, 0, False), cell(png, 1, 0, False))


def test_default_prompts_spread_over_the_shared_loader(tiny_model_dir, tmp_path, monkeypatch):
    """Without --prompts, sample.py takes 4 prompts spread over what load_prompts("", model) gives: the model's
    prompts.json, else simple_animals (bare words, "cat" not "a cat")."""
    assert not (tiny_model_dir / "prompts.json").exists()
    monkeypatch.chdir(tmp_path)
    script = load_sample_script()
    drawn = []
    real_sample = script.sample

    def recording_sample(sd, prompts, *args, **kwargs):
        drawn.append(list(prompts))
        return real_sample(sd, prompts, *args, **kwargs)

    monkeypatch.setattr(script, "sample", recording_sample)
    script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "1", "--ckpt", "base",
                                          "--out", "animals.png"]))
    assert drawn == [["cat", "goat", "fish", "duck"]]  # simple_animals[0], [11], [22], [33]


def test_prompts_and_reward_are_checked_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    script = load_sample_script()

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(script.StableDiffusion, "from_pretrained", no_loading)
    # the tiny world's checker cannot score animals
    with pytest.raises(UsageError) as exit_info:
        script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--reward", "tinyworld"]))
    assert "reward tinyworld" in str(exit_info.value) and "4 of 4 prompts are not" in str(exit_info.value)
    # a model whose prompts.json is not a list of strings
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "prompts.json").write_text(json.dumps({"prompts": ["a cat"]}))
    with pytest.raises(UsageError) as exit_info:
        script.main(script.parser.parse_args(["--model", str(model)]))
    assert f"{model / 'prompts.json'} must hold a JSON list of strings, found a dict" in str(exit_info.value)


def test_custom_reward(workdir, tiny_model_dir, monkeypatch, capsys):
    """--reward path/to/file.py:function scores the grid; a missing function is one clear line."""
    (workdir / "my_reward.py").write_text("import numpy as np\ndef score(images, prompts):\n"
                                          "    return np.full(len(images), 0.5)\n")
    monkeypatch.chdir(workdir)
    script = load_sample_script()
    script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "1", "--ckpt", "base",
                                          "--prompts", "a cat", "--reward", "my_reward.py:score", "--out", "custom.png"]))
    assert "base: mean my_reward.py:score reward 0.5000 over 1 images" in capsys.readouterr().out
    with pytest.raises(UsageError) as exit_info:
        script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--reward", "my_reward.py:nope"]))
    assert "reward my_reward.py:nope: nope is not defined in my_reward.py (its functions: score)" in str(exit_info.value)


def test_sample_runs_in_the_precision_train_py_picks_for_the_device(workdir, tiny_model_dir, monkeypatch):
    # bf16 autocast on every GPU would be emulated on a T4 or V100: sample.py asks, as train.py does (cli.autocast_to)
    monkeypatch.chdir(workdir)
    script, asked = load_sample_script(), []
    monkeypatch.setattr(script, "auto_precision", lambda device: asked.append(str(device)) or "fp32")
    monkeypatch.setattr(script, "autocast_to", lambda device, precision: asked.append((str(device), precision)) or
                        contextlib.nullcontext())
    script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "1", "--ckpt", "base",
                                          "--prompts", "a cat", "--out", "precision.png"]))
    assert asked == ["cpu", ("cpu", "fp32")]


def test_default_checkpoint_is_the_newest_runs_latest(tmp_path):
    """Without --ckpt, sample.py compares the base model with the latest checkpoint of the run written most recently,
    whichever run sorts first by name or has the higher step numbers."""
    from nanoddpo.checkpoint import latest_run_checkpoint

    for run, steps, written in (("a_new", (1, 2), 2_000_000_000), ("b_old", (5, 9), 1_000_000_000)):
        for step in steps:
            folder = tmp_path / "runs" / run / "checkpoints" / f"step_{step}"
            folder.mkdir(parents=True)
            os.utime(folder, (written + step, written + step))
    assert latest_run_checkpoint(tmp_path / "runs") == tmp_path / "runs/a_new/checkpoints/step_2"


def test_each_cell_is_its_prompt_and_seed_on_its_own_rows_model(workdir, tiny_model_dir, monkeypatch, capsys):
    """Column j shows prompt j // per_prompt at seed j % per_prompt (--per-prompt 2: seeds 0 and 1, as its help
    says), and each row is its own model alone: the base row after a checkpoint's row is, image for image, what
    ddim.sample draws from a freshly loaded base model. Sampling is at DDPO's published defaults (the authors'
    config/base.py: sample.guidance_scale 5.0, sample.eta 1.0, sample.num_steps 50) when the checkpoints do not say."""
    from nanoddpo.ddim import sample

    monkeypatch.chdir(workdir)
    script = load_sample_script()
    calls = []

    def recording(sd, prompts, seeds, **kw):
        trajectory = sample(sd, prompts, seeds, **kw)
        calls.append((list(prompts), list(seeds), kw, trajectory.images))
        return trajectory

    monkeypatch.setattr(script, "sample", recording)
    script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "2", "--ckpt",
                                          "runs/demo/checkpoints/step_2", "base", "--prompts", "a cat", "a dog",
                                          "--per-prompt", "2", "--batch-size", "1", "--out", "cells.png"]))
    assert [(p, s) for p, s, _, _ in calls] == [([p], [s]) for _ in range(2) for p in ("a cat", "a dog") for s in (0, 1)]
    assert all(kw["guidance_scale"] == 5.0 and kw["eta"] == 1.0 and kw["num_steps"] == 2 for _, _, kw, _ in calls)
    fresh = StableDiffusion.from_pretrained(tiny_model_dir)
    for prompts, seeds, kw, images in calls[4:]:  # the base row, sampled after the checkpoint's row
        assert torch.equal(images, sample(fresh, prompts, seeds, **kw).images)

    def stop(sd, prompts, seeds, **kw):
        calls.append(kw)
        raise SystemExit(0)
    monkeypatch.setattr(script, "sample", stop)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # no checkpoint to take the steps from
        script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--ckpt", "base", "--out", "x.png"]))
    assert calls[-1]["num_steps"] == 50 and calls[-1]["eta"] == 1.0 and calls[-1]["guidance_scale"] == 5.0
    assert "DDIM steps 50, eta 1.0, guidance 5.0: the defaults (no checkpoint);" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # base twice (a seed-noise check) is still no checkpoint
        script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--ckpt", "base", "base"]))
    assert "the defaults (no checkpoint);" in capsys.readouterr().out


def test_paired_difference_is_the_mean_and_standard_error_of_per_image_differences(workdir, tiny_model_dir,
                                                                                  monkeypatch, capsys):
    """Each checkpoint's line gives mean(d) +- sd(d) / sqrt(n) over the per-image differences d = checkpoint - base
    (the sample standard deviation, n - 1), computed here by hand from the scores sample.py writes."""
    monkeypatch.chdir(workdir)
    script = load_sample_script()
    script.main(script.parser.parse_args(["--model", str(tiny_model_dir), "--steps", "2", "--ckpt", "base",
                                          "runs/demo/checkpoints/step_2", "--prompts", "a cat", "a dog",
                                          "--per-prompt", "2", "--reward", "jpeg", "--scores", "paired.json",
                                          "--out", "paired.png"]))
    scores = json.loads((workdir / "paired.json").read_text())["scores"]["jpeg"]
    d = [c - b for c, b in zip(scores["runs/demo/checkpoints/step_2"], scores["base"])]
    n = len(d)
    mean = sum(d) / n
    standard_error = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 / n**0.5
    assert n == 4 and standard_error > 0
    line = f"{mean:+.4f} +- {standard_error:.4f} paired against base"
    assert line in capsys.readouterr().out
