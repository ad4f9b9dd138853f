"""Tests of the tiny world (nanoddpo/world.py) and the bundled model made from it (weights/tiny).

    python -m pytest -q tests/test_5_world.py
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoddpo import world
from nanoddpo.cli import UsageError
from nanoddpo.rewards import get_reward

TINY = Path(__file__).resolve().parent.parent / "weights" / "tiny"


def test_prompts_cover_the_world_and_parse_back():
    assert len(world.PROMPTS) == len(set(world.PROMPTS)) == 5 * 4 * 4
    assert world.PROMPTS[0] == "a red circle on a plain background"
    for prompt in world.PROMPTS:
        assert world.make_prompt(*world.parse_prompt(prompt)) == prompt
    with pytest.raises(ValueError):
        world.parse_prompt("a cat riding a bike")


def test_drawing_is_deterministic_per_seed():
    a = world.draw("red", "triangle", "noisy", seed=3)
    assert a.shape == (world.SIZE, world.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, world.draw("red", "triangle", "noisy", seed=3))
    assert not np.array_equal(a, world.draw("red", "triangle", "noisy", seed=4))
    images, prompts = world.random_dataset(6, seed=1)
    images2, prompts2 = world.random_dataset(6, seed=1)
    assert prompts == prompts2 and np.array_equal(images, images2)


def test_checker_reads_drawn_images():
    images, prompts = world.random_dataset(300, seed=7)
    found = [world.check(img) for img in images]
    for i, key in enumerate(("colour", "shape", "background")):
        accuracy = np.mean([f[key] == world.parse_prompt(p)[i] for f, p in zip(found, prompts)])
        assert accuracy >= 0.95, (key, accuracy)
    # a picture with no shape and no texture: no colour or shape is claimed, the background is plain
    grey = np.full((world.SIZE, world.SIZE, 3), 128, dtype=np.uint8)
    assert world.check(grey) == {"colour": None, "shape": None, "background": "plain"}


def test_contact_sheet_command(tmp_path, capsys):
    """python -m nanoddpo.world: the checker's accuracy on 2,000 drawn images, then 8 rows of 16 pictures at 2x."""
    world.main(["--out", str(tmp_path / "sheets" / "world.png")])
    sheet = Image.open(tmp_path / "sheets" / "world.png")
    assert sheet.size == (16 * world.SIZE * 2, 8 * world.SIZE * 2)
    printed = capsys.readouterr().out
    for key in ("colour", "shape", "background"):
        assert float(printed.split(f"checker {key} accuracy on 2000 drawn images: ")[1].split()[0]) >= 0.95
    with pytest.raises(UsageError, match="--out .*world.txt: must end in .png"):
        world.main(["--out", str(tmp_path / "world.txt")])


def test_tinyworld_reward_prefers_matching_prompts():
    reward = get_reward("tinyworld")
    images, prompts = world.random_dataset(40, seed=2)
    matching = reward(images, prompts)
    # the same images under a caption that differs in exactly one attribute, or in all three
    one_off, all_off = [], []
    for p in prompts:
        colour, shape, background = world.parse_prompt(p)
        other_colour = [c for c in world.COLOURS if c != colour][0]
        other_shape = [s for s in world.SHAPES if s != shape][0]
        other_background = [b for b in world.BACKGROUNDS if b != background][0]
        one_off.append(world.make_prompt(other_colour, shape, background))
        all_off.append(world.make_prompt(other_colour, other_shape, other_background))
    assert matching.shape == (40,) and matching.dtype == np.float32
    assert matching.mean() >= 0.95
    assert abs((matching - reward(images, one_off)).mean() - 1 / 3) < 0.05  # one attribute of three is lost
    assert matching.mean() > reward(images, one_off).mean() > reward(images, all_off).mean()
    assert reward(images, all_off).mean() <= 0.05


def test_tokenizer_makes_each_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    alphabet = list(world.bytes_to_unicode().values())
    assert len(set(alphabet)) == 256 and all(c.isprintable() and not c.isspace() for c in alphabet)
    vocab_size = world.write_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == vocab_size
    tokens = sorted(vocab, key=vocab.get)
    assert tokens[:256] == alphabet and tokens[256:512] == [c + "</w>" for c in alphabet]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")

    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    for word in world.WORDS:
        ids = tokenizer(word).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == 3 and tokenizer.convert_ids_to_tokens(ids[1]) == word + "</w>", word
    ids = tokenizer("a Red  CIRCLE on a plain background", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[1:8] == [vocab[w + "</w>"] for w in "a red circle on a plain background".split()]
    # words outside the world still tokenize, into byte-level pieces
    assert len(tokenizer("zebra").input_ids) > 3


def test_hue_is_hsv_hue():
    """The checker's hue is the HSV hue of the standard library's colorsys, in degrees, for every kind of colour."""
    import colorsys

    rng = np.random.default_rng(0)
    colours = [*world.COLOURS.values(), (40, 220, 200), (200, 40, 120), (90, 90, 90), *rng.integers(256, size=(200, 3))]
    for rgb in colours:
        rgb = np.array(rgb, dtype=np.float64)
        assert abs(world._hue(rgb) - 360 * colorsys.rgb_to_hsv(*rgb / 255)[0]) < 1e-9, rgb


def test_byte_alphabet_is_gpt2s():
    """bytes_to_unicode is GPT-2's (and CLIP's) byte-level alphabet, byte for byte, as transformers builds it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert world.bytes_to_unicode() == bytes_to_unicode()


needs_weights = pytest.mark.skipif(not (TINY / "unet").is_dir(), reason="weights/tiny not made yet "
                                   "(python -m nanoddpo.pretrain --out weights/tiny)")


@needs_weights
def test_bundled_model_loads_and_is_small():
    from nanoddpo.model import StableDiffusion

    size = sum(f.stat().st_size for f in TINY.rglob("*") if f.is_file())
    assert size <= 25e6
    assert json.loads((TINY / "prompts.json").read_text()) == world.PROMPTS
    sd = StableDiffusion.from_pretrained(TINY)
    assert sd.latent_shape == (4, 8, 8) and sd.image_size == world.SIZE
    context = sd.encode_prompts(world.PROMPTS[:2])
    assert context.shape == (2, 77, sd.text_encoder.cfg["hidden_size"])


@needs_weights
def test_bundled_model_draws_what_it_is_asked():
    import torch

    from nanoddpo.ddim import sample
    from nanoddpo.model import StableDiffusion

    sd = StableDiffusion.from_pretrained(TINY)
    prompts = world.PROMPTS[::5]  # 16 captions: every colour, shape and background
    # one thread: this model gains little from more, and on a busy machine spinning OpenMP threads cost 10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = sample(sd, prompts, seeds=range(len(prompts)), num_steps=10, guidance_scale=5.0).images
    finally:
        torch.set_num_threads(threads)
    images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # chance is about 0.23 (1/5 colours, 1/4 shapes, 1/4 backgrounds)
    assert world.tinyworld_reward(images, prompts).mean() > 0.7  # 0.94 when made


def scaled_latent_std(sd, n):
    """Std of the latents, times the model's scaling factor, of the first n images a pretrain run with seed 0 trains
    on (one draw from each image's latent Gaussian): 1 if the scaling factor is right."""
    import torch

    from nanoddpo import pretrain

    images, _ = world.random_dataset(n, seed=0)
    with torch.no_grad():
        mean, logvar = pretrain.vae_moments(sd.vae, pretrain.to_unit_range(images))
    latents = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    return (latents * sd.scaling_factor).std().item()


def test_pretrain_runs_end_to_end_and_writes_a_loadable_model(tmp_path):
    """A few steps of every stage of nanoddpo/pretrain.py (the real run is 2500 UNet steps); the folder it writes
    must load like the published layout, and a short evaluation (fewer samples than one sheet row) must not fail."""
    from nanoddpo import pretrain
    from nanoddpo.model import StableDiffusion

    out = tmp_path / "tiny"
    pretrain.main(["--out", str(out), "--images", "160", "--vae_steps", "2", "--unet_steps", "2", "--warmup", "1",
                   "--eval_samples", "8", "--eval_steps", "2", "--threads", "1"])
    sd = StableDiffusion.from_pretrained(out)
    assert sd.latent_shape == (4, 8, 8)
    assert scaled_latent_std(sd, 160) == pytest.approx(1.0, abs=0.03)  # what it trained on; 1.21 unscaled
    assert json.loads((out / "prompts.json").read_text()) == list(world.PROMPTS)
    squares = json.loads((out / "squares.json").read_text())
    assert len(squares) == 5 * 4 and all(" square " in p for p in squares)  # every colour on every background
    results = json.loads((out / "pretrain.json").read_text())["results"]
    assert 0 <= results["checker_on_samples"]["all"] <= 1 and (out / "samples.png").is_file()
    for flags, message in ((["--eval_samples", "0"], "--eval-samples 0: must be at least 1"),
                           (["--ema", "1"], "--ema 1.0: must be in [0, 1)"), (["--lr", "nan"], "--lr: nan: expected a "
                           "finite number"), (["--cfg-dropout", "1.5"], "--cfg-dropout 1.5: must be in [0, 1]"),
                           (["--lr", "0"], "--lr 0.0: must be above 0"), (["--warmup", "-1"], "--warmup -1: must be 0 or "
                           "more")):
        with pytest.raises(UsageError) as error:  # one line each, before any work
            pretrain.get_args(flags)
        assert str(error.value).startswith(message), error.value
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="--out .*file: is a file: give a folder"):  # before training, not after
        pretrain.main(["--out", str(tmp_path / "file")])


def test_pretrain_schedules_and_the_vae_prior():
    import math

    import torch
    from torch.distributions import Normal, kl_divergence

    from nanoddpo.pretrain import ema_decay, lr_at, vae_kl

    # linear warm-up over 10 of 110 steps, then a cosine from the peak down to a tenth of it
    assert [lr_at(s, 110, 10) for s in (0, 4, 9, 10)] == [0.1, 0.5, 1.0, 1.0]
    assert lr_at(60, 110, 10) == pytest.approx(0.55) and lr_at(110, 110, 10) == pytest.approx(0.1)
    assert lr_at(35, 110, 10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    # the weight average moves fast at first and settles at its cap
    assert [ema_decay(s, 0.998) for s in (0, 8)] == [0.1, 0.5]
    assert ema_decay(2499, 0.998) == pytest.approx(2500 / 2509) and ema_decay(10**6, 0.998) == 0.998
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean()
    assert vae_kl(mean, logvar).item() == pytest.approx(expected.item(), rel=1e-6)


def test_pretraining_predicts_the_noise_of_sds_forward_process():
    import torch

    from nanoddpo.ddim import DDIM
    from nanoddpo.pretrain import denoising_loss

    ddim, gen = DDIM(), torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 250, 600, 999])
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    a = alpha_bar[t].float().view(-1, 1, 1, 1)

    def oracle(z_t, t, context):  # knows z0: recovers the noise from z_t = sqrt(a) z0 + sqrt(1 - a) noise
        return (z_t - a.sqrt() * z0) / (1 - a).sqrt()
    assert denoising_loss(oracle, ddim, z0, t, noise, None).item() < 1e-9
    zeros = lambda z_t, t, context: torch.zeros_like(z_t)  # noqa: E731
    assert denoising_loss(zeros, ddim, z0, t, noise, None).item() == pytest.approx(noise.pow(2).mean().item())


def test_vae_moments_are_the_encoders_gaussian(tiny_model_dir):
    import torch

    from nanoddpo.model import StableDiffusion
    from nanoddpo.pretrain import vae_moments

    vae = StableDiffusion.from_pretrained(tiny_model_dir).vae
    with torch.no_grad():  # a log-variance beyond SD's clamp in one channel, so the clamp is seen at work
        vae.quant_conv.bias[5] = 40.0
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = []  # what goes into quant_conv: its 2C output channels are (mean, log-variance)
    vae.quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    mean, logvar = vae_moments(vae, x)
    h = vae.quant_conv(seen[0])
    torch.testing.assert_close(mean, vae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(mean, h[:, :4])
    torch.testing.assert_close(logvar, h[:, 4:].clamp(-30, 20))
    assert logvar[:, 1].max() == 20


@needs_weights
def test_the_bundled_model_is_what_pretrain_makes():
    """`python -m nanoddpo.pretrain --out weights/tiny --threads 1` re-creates weights/tiny (docs/RESULTS.md): the
    committed run's settings are today's defaults, its configs today's, and its latents have unit variance."""
    from nanoddpo import pretrain
    from nanoddpo.model import StableDiffusion

    saved = json.loads((TINY / "pretrain.json").read_text())["settings"]
    defaults = vars(pretrain.get_args(["--threads", "1"]))
    assert {k: v for k, v in saved.items() if k != "out"} == {k: v for k, v in defaults.items() if k != "out"}
    for folder, cfg in (("unet", pretrain.UNET), ("vae", pretrain.VAE), ("text_encoder", pretrain.TEXT)):
        written = json.loads((TINY / folder / "config.json").read_text())
        assert {k: written[k] for k in cfg} == cfg, folder
    assert json.loads((TINY / "scheduler" / "scheduler_config.json").read_text()) == pretrain.SCHEDULER
    sd = StableDiffusion.from_pretrained(TINY)
    assert scaled_latent_std(sd, 400) == pytest.approx(1.0, abs=0.02)  # the first 400 of the 20,000 it trained on
