"""
Make the bundled tiny text-to-image model (weights/tiny) from scratch on a CPU, on pictures from nanoddpo/world.py.

    python -m nanoddpo.pretrain --out weights/tiny --threads 2   # 30 min on an idle 2-core CPU; fixed seeds
    python -m nanoddpo.pretrain --out weights/tiny --threads 1   # ~40 min, bit-identical to the committed weights
    python -m nanoddpo.pretrain --out /tmp/t --vae-steps 50 --unet-steps 50 --eval-samples 16   # a 1-minute smoke run

It is Stable Diffusion in miniature, trained the way SD was, one stage after the other:
  1. tokenizer: a CLIP-format BPE vocabulary in which every word of the world is one token (world.write_tokenizer);
  2. VAE: a KL autoencoder, 32x32x3 images <-> 8x8x4 latents, trained on reconstruction MSE plus a small KL term;
     then scaling_factor = 1 / std of the latents, so the diffusion model sees unit-variance latents (SD: 0.18215);
  3. UNet and text encoder, trained together from scratch on the epsilon-prediction loss with SD's schedule
     (1000 steps, scaled-linear betas 0.00085..0.012, from nanoddpo/ddim.py). The text encoder learns end to end
     through the cross-attention; 10% of captions are replaced by "" so classifier-free guidance works;
  4. evaluation: samples at guidance 5 read back by the world's checker, and their JPEG sizes.
The result loads with StableDiffusion.from_pretrained like SD v1-4, and is saved with prompts.json (the 80 captions
train.py and sample.py use for it), squares.json (the 20 square prompts of the alignment task) and pretrain.json
(these settings and the evaluation numbers).
"""
import argparse
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from nanoddpo import world
from nanoddpo.cli import Parser, check_output, need, number, run
from nanoddpo.ddim import DDIM, sample
from nanoddpo.images import to_uint8
from nanoddpo.model import StableDiffusion, load_tokenizer, save_json
from nanoddpo.rewards import jpeg_kb

# Sizes: a forward of the UNet on a CFG-doubled batch of 64 takes about 0.11 s on 2 idle CPU cores (0.25 s on one
# thread of a busy machine), which is what makes DDPO on this model a matter of minutes. In fp32 the three networks
# take 8 MB. Training is deterministic for a given --seed and thread count (same bytes on a rerun).
UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 4, "norm_num_groups": 8,
    "norm_eps": 1e-5, "cross_attention_dim": 64, "in_channels": 4, "out_channels": 4, "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "center_input_sample": False,
    "mid_block_scale_factor": 1,
}
VAE = {  # three levels: factor 4, 32x32 images <-> 8x8 latents (one latent cell per 4x4 pixels)
    "block_out_channels": [32, 32, 64], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
    "in_channels": 3, "out_channels": 3, "act_fn": "silu", "sample_size": world.SIZE,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
}
TEXT = {  # vocab_size and the special token ids are filled in from the tokenizer
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 64, "num_attention_heads": 4,
    "intermediate_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 64,
}
SCHEDULER = {  # SD v1-4's scheduler_config.json: the schedule nanoddpo/ddim.py implements
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
    "skip_prk_steps": True,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
    "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def get_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # errors: one line
    p.add_argument("--out", default="weights/tiny", help="model folder to write (published SD layout)")

    def flag(name, default, help):  # --vae-steps or --vae_steps; a whole or a finite number, as the default is
        p.add_argument(*dict.fromkeys([f"--{name.replace('_', '-')}", f"--{name}"]), type=number(type(default)),
                       default=default, help=help)
    flag("seed", 0, "seeds the data, the initialisation and the training order")
    flag("images", 20000, "drawn training images (250 per caption)")
    flag("vae_steps", 1200, "VAE optimizer steps")
    flag("vae_batch", 32, "VAE batch size")
    flag("vae_lr", 2e-3, "VAE AdamW learning rate (cosine decay to 10%%)")
    flag("kl_weight", 1e-4, "weight of the KL term per latent element (reconstruction MSE is per pixel, images in "
         "[-1, 1])")
    flag("unet_steps", 2500, "UNet + text encoder optimizer steps")
    flag("batch", 64, "UNet batch size")
    flag("lr", 1e-3, "UNet + text encoder AdamW learning rate (cosine to 10%%)")
    flag("warmup", 100, "linear warm-up steps of both learning rates")
    flag("cfg_dropout", 0.1, "fraction of captions replaced by the empty prompt")
    flag("ema", 0.998, "decay of the weight average that is saved")
    flag("eval_samples", 320, "samples drawn at the end to measure the model")
    flag("eval_steps", 20, "DDIM steps (eta 1) of those samples")
    flag("guidance", 5.0, "classifier-free guidance scale of those samples")
    flag("threads", 0, "CPU threads for torch (0: torch's default). On a machine shared with other jobs, 1 avoids "
         "threads waiting on each other and is often faster")
    args = p.parse_args(argv)
    for name in ("images", "vae_steps", "vae_batch", "unet_steps", "batch", "eval_samples", "eval_steps"):
        need(getattr(args, name) >= 1, name, getattr(args, name), "must be at least 1")
    for name in ("seed", "warmup", "kl_weight", "guidance", "threads"):
        need(getattr(args, name) >= 0, name, getattr(args, name), "must be 0 or more")
    for name in ("vae_lr", "lr"):
        need(getattr(args, name) > 0, name, getattr(args, name), "must be above 0")
    need(0 <= args.cfg_dropout <= 1, "cfg_dropout", args.cfg_dropout, "must be in [0, 1]")
    need(0 <= args.ema < 1, "ema", args.ema, "must be in [0, 1): the share of the old average kept at each step")
    return args


def lr_at(step, total, warmup):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def to_unit_range(images_uint8):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def vae_moments(vae, images):
    """Mean and log-variance of the latent Gaussian. VAE.encode returns only the mean (all sampling needs); training
    needs the log-variance too, which is the other half of quant_conv's output, so catch that output on its way."""
    caught = []
    handle = vae.quant_conv.register_forward_hook(lambda module, inputs, output: caught.append(output))
    try:
        vae.encode(images)
    finally:
        handle.remove()
    mean, logvar = caught[0].chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)  # SD's clamp: keeps exp(logvar) finite early in training


def vae_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)), the mean over latent elements: the VAE's pull towards the prior."""
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()


def ema_decay(step, cap):
    """The weight average's decay at update `step`: short at first, so the average does not stay near the random
    initialisation, rising to `cap`: 0.1 at step 0, 0.5 at step 8, 0.996 at step 2,499 (the last of the default run),
    the default cap 0.998 from step 4,490 on."""
    return min(cap, (1 + step) / (10 + step))


def train_vae(sd, images, args, gen):
    vae = sd.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    bar = tqdm(range(args.vae_steps), desc="1/3 VAE")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * lr_at(step, args.vae_steps, args.warmup)
        x = to_unit_range(images[torch.randint(len(images), (args.vae_batch,), generator=gen).numpy()])
        mean, logvar = vae_moments(vae, x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)  # reparameterised latent sample
        mse = F.mse_loss(vae.decode(z), x)
        kl = vae_kl(mean, logvar)
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images, batch=500):
    """Latent means and stds of every training image, unscaled: (N, 4, 8, 8) each."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="   encode"):
        mean, logvar = vae_moments(vae, to_unit_range(images[i:i + batch]))
        means.append(mean)
        stds.append((0.5 * logvar).exp())
    return torch.cat(means), torch.cat(stds)


def denoising_loss(unet, ddim, z0, t, noise, context):
    """DDPM's simple loss: take z0 to timestep t (B,) by the forward process q(z_t | z_0) with `noise`, and score the
    UNet's prediction of that noise."""
    return F.mse_loss(unet(ddim.add_noise(z0, noise, t), t, context), noise)


def train_unet(sd, latent_mean, latent_std, prompt_index, args, gen):
    """Epsilon prediction (DDPM's simple loss) for the UNet and the text encoder together.

    prompt_index[i] is image i's caption as an index into world.PROMPTS. Each distinct caption of a batch is encoded
    once (a batch of 64 holds about 45 of the 81) and its context shared by the images that carry it."""
    unet, text_encoder = sd.unet.train().requires_grad_(True), sd.text_encoder.train().requires_grad_(True)
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ddim = DDIM()  # the training schedule (1000 steps), from the one copy in ddim.py
    ids = sd.tokenize(world.PROMPTS + [""])  # (81, 77); the last row is the empty prompt
    empty = len(world.PROMPTS)
    bar = tqdm(range(args.unet_steps), desc="2/3 UNet + text encoder")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_at(step, args.unet_steps, args.warmup)
        idx = torch.randint(len(latent_mean), (args.batch,), generator=gen)
        z0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * sd.scaling_factor
        caption = prompt_index[idx].clone()
        caption[torch.rand(args.batch, generator=gen) < args.cfg_dropout] = empty
        t = torch.randint(1000, (args.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        distinct, which = caption.unique(return_inverse=True)
        context = text_encoder(ids[distinct])[which]  # (B, 77, D)
        loss = denoising_loss(unet, ddim, z0, t, noise, context)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # the saved weights are an exponential moving average: far less noisy samples after a short run
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - ema_decay(step, args.ema))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def agreement(images, prompts):
    """Per-attribute and all-three agreement of the checker with the prompts, and the per-image results."""
    found = [world.check(img) for img in images]
    keys = ("colour", "shape", "background")
    hits = np.array([[f[k] == v for k, v in zip(keys, world.parse_prompt(p))] for f, p in zip(found, prompts)])
    rates = {k: float(hits[:, i].mean()) for i, k in enumerate(keys)}
    rates["all"] = float(hits.all(1).mean())
    return rates, hits


@torch.no_grad()
def evaluate(sd, args, out):
    """Checker on drawn images and VAE reconstructions, then samples at guidance args.guidance; returns a dict."""
    results = {}
    drawn, drawn_prompts = world.random_dataset(800, seed=args.seed + 1)  # not the training images
    results["checker_on_drawn"] = agreement(drawn, drawn_prompts)[0]
    recon = to_uint8(sd.vae.decode(sd.vae.encode(to_unit_range(drawn))) / 2 + 0.5)
    results["checker_on_vae_reconstructions"] = agreement(recon, drawn_prompts)[0]
    results["vae_reconstruction_mse_uint8"] = float(((recon.astype(np.float64) - drawn) ** 2).mean())

    prompts = [world.PROMPTS[i % len(world.PROMPTS)] for i in range(args.eval_samples)]
    seeds = [10_000 + i for i in range(args.eval_samples)]
    images = []
    for i in tqdm(range(0, len(prompts), 80), desc="3/3 evaluate"):
        traj = sample(sd, prompts[i:i + 80], seeds[i:i + 80], num_steps=args.eval_steps, guidance_scale=args.guidance)
        images.append(to_uint8(traj.images))
    images = np.concatenate(images)
    rates, hits = agreement(images, prompts)
    results["checker_on_samples"] = rates
    results["tinyworld_reward_of_samples"] = float(world.tinyworld_reward(images, prompts).mean())
    for name, imgs in (("samples", images), ("drawn", drawn)):
        kb = jpeg_kb(imgs)
        results[f"jpeg_kb_q95_of_{name}"] = {stat: round(float(getattr(kb, stat)()), 3)
                                             for stat in ("min", "mean", "max", "std")}
    by_attribute = {}
    for i, key in enumerate(("colour", "shape", "background")):
        for value in (world.COLOURS if key == "colour" else world.SHAPES if key == "shape" else world.BACKGROUNDS):
            rows = [j for j, p in enumerate(prompts) if world.parse_prompt(p)[i] == value]
            if rows:  # a short evaluation may not reach every value
                by_attribute[f"{key}={value}"] = float(hits[rows].all(1).mean())
    results["all_three_correct_by_attribute"] = by_attribute
    failures = Counter(p for p, h in zip(prompts, hits) if not h.all())
    results["prompts_failed_most"] = failures.most_common(10)
    # contact sheet, 16 per row in PROMPTS order: with 160 or more samples, every caption twice
    columns = min(16, len(images))
    rows = min(10, len(images) // columns)
    grid = images[:columns * rows].reshape(rows, columns, *images.shape[1:])
    sheet = np.concatenate([np.concatenate(list(row), axis=1) for row in grid], axis=0)
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(out / "samples.png")
    return results


def size_mb(folder):
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


def main(argv=None):
    args = get_args(argv)
    check_output(args.out, "out")  # now, not after half an hour of training
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()

    # 0. data and tokenizer
    images, prompts = world.random_dataset(args.images, seed=args.seed)
    prompt_index = torch.tensor([world.PROMPTS.index(p) for p in prompts])
    tokenizer_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    vocab_size = world.write_tokenizer(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    text_cfg = dict(TEXT, vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sd = StableDiffusion(UNET, VAE, text_cfg, tokenizer)
    counts = {name: sum(p.numel() for p in getattr(sd, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    print(f"{len(images)} images of {len(world.PROMPTS)} captions, vocab {vocab_size} tokens")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items()) +
          f" ({4 * sum(counts.values()) / 1e6:.1f} MB in fp32)")
    print(f"VAE: {args.vae_steps} steps x {args.vae_batch} images; UNet: {args.unet_steps} steps x {args.batch} latents "
          f"= {args.unet_steps * args.batch / len(images):.1f} epochs")

    train_vae(sd, images, args, gen)
    drawn, drawn_prompts = world.random_dataset(400, seed=args.seed + 1)
    with torch.no_grad():
        recon = to_uint8(sd.vae.decode(sd.vae.encode(to_unit_range(drawn))) / 2 + 0.5)
    print(f"checker on VAE reconstructions of drawn images: {agreement(recon, drawn_prompts)[0]}")
    latent_mean, latent_std = encode_all(sd.vae, images)
    # scale so that the latents the UNet sees have unit variance (SD v1's 0.18215 plays the same role)
    latents = latent_mean + latent_std * torch.randn(latent_mean.shape, generator=gen)
    scaling_factor = float(1 / latents.std())
    sd.scaling_factor = sd.vae.cfg["scaling_factor"] = round(scaling_factor, 5)
    print(f"scaling_factor = {sd.scaling_factor}")

    train_unet(sd, latent_mean, latent_std, prompt_index, args, gen)

    out.mkdir(parents=True, exist_ok=True)
    sd.save_pretrained(out)
    if not (out / "scheduler" / "scheduler_config.json").is_file():
        (out / "scheduler").mkdir(exist_ok=True)
        save_json(SCHEDULER, out / "scheduler" / "scheduler_config.json")
    if not (out / "model_index.json").is_file():
        save_json(MODEL_INDEX, out / "model_index.json")
    save_json(world.PROMPTS, out / "prompts.json")
    save_json([p for p in world.PROMPTS if " square " in p], out / "squares.json")  # the alignment task's prompts
    train_minutes = (time.time() - start) / 60

    sd = StableDiffusion.from_pretrained(out)  # evaluate exactly what was written
    results = evaluate(sd, args, out)
    results["train_minutes"] = round(train_minutes, 1)
    results["parameters"] = counts
    save_json({"settings": vars(args), "results": results}, out / "pretrain.json")
    print(json.dumps(results, indent=2))
    print(f"wrote {out} ({size_mb(out):.1f} MB) in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    run("nanoddpo.pretrain", main)
