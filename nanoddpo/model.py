"""
Stable Diffusion v1 in one file: the CLIP text encoder, the UNet and the VAE, and the loader for the published weights.

Data flow of one text-to-image sample (shapes for SD v1-4 at 512 x 512):

    prompt -> tokenizer -> ids (77,) -> TextEncoder -> context (77, 768)
    noise z_T (4, 64, 64) -> UNet(z_t, t, context) -> eps (4, 64, 64) -> DDIM step (nanoddpo/ddim.py) -> ... -> z_0
    z_0 / 0.18215 -> VAE decoder -> image (3, 512, 512) in [-1, 1]

Module attribute names mirror the keys of the published safetensors files (diffusers' layout of
CompVis/stable-diffusion-v1-4), so `unet.state_dict()` has exactly the published key names and loading needs no
converter: only the short RENAMES table below for the older names some files still use. Architecture sizes come
from each component's config.json, so the same code builds SD v1-4 and the tiny models used on CPU and in tests.

    sd = StableDiffusion.from_pretrained("weights/stable-diffusion-v1-4", device="cuda", dtype=torch.float16)
"""
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from nanoddpo.cpu_layers import Conv2d, Linear  # nn.Conv2d and nn.Linear, with fast paths on a CPU

# -----------------------------------------------------------------------------
# Building blocks shared by the UNet and the VAE


def GroupNorm(channels, groups, eps):
    return nn.GroupNorm(groups, channels, eps=eps)


class ResnetBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + SiLU, plus the timestep embedding in between (UNet only). diffusers: ResnetBlock2D."""

    def __init__(self, cin, cout, groups, eps, temb_channels=None, output_scale=1.0):
        super().__init__()
        self.norm1 = GroupNorm(cin, groups, eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, cout) if temb_channels else None
        self.norm2 = GroupNorm(cout, groups, eps)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None
        self.output_scale = output_scale

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The VAE pads only right/bottom by hand (padding=0), the UNet pads 1 all round."""

    def __init__(self, channels, padding):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.pad_by_hand = padding == 0

    def forward(self, x):
        if self.pad_by_hand:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv. diffusers: Upsample2D."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention on (B, N, C) with optional cross-attention context. diffusers: Attention.
    The UNet's q/k/v have no bias; the VAE's do. to_out is a list so the key reads to_out.0 as published."""

    def __init__(self, dim, heads, context_dim=None, bias=False):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=bias)
        self.to_k = Linear(context_dim, dim, bias=bias)
        self.to_v = Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([Linear(dim, dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate) (Shazeer 2020). diffusers: GEGLU."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = Linear(dim, 2 * hidden)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        # net.1 is a dropout slot in the published layout (no weights), kept so net.2 keeps its key name.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, feed-forward. diffusers: BasicTransformerBlock."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with a residual. diffusers: Transformer2DModel."""

    def __init__(self, channels, heads, context_dim, groups, depth=1):
        super().__init__()
        self.norm = GroupNorm(channels, groups, 1e-6)
        self.proj_in = Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C): one token per latent pixel
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.proj_out(h)


# -----------------------------------------------------------------------------
# UNet: eps = UNet(z_t, t, context). diffusers: UNet2DConditionModel.


def timestep_embedding(t, dim, flip_sin_to_cos=True, shift=0.0):
    """Sinusoidal embedding of the (B,) timesteps, as in the transformer's position encoding."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


def _per_block(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ch = cfg["block_out_channels"]
        n, layers, groups, eps = len(ch), cfg["layers_per_block"], cfg["norm_num_groups"], cfg["norm_eps"]
        # SD v1 configs call the number of heads "attention_head_dim" (8); newer configs say num_attention_heads.
        heads = _per_block(cfg.get("num_attention_heads") or cfg["attention_head_dim"], n)
        ctx, temb = cfg["cross_attention_dim"], 4 * ch[0]
        depth = cfg.get("transformer_layers_per_block", 1)
        res = lambda cin, cout, scale=1.0: ResnetBlock(cin, cout, groups, eps, temb, scale)
        attn = lambda c, h: SpatialTransformer(c, h, ctx, groups, depth)

        self.conv_in = Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = nn.ModuleDict(dict(linear_1=Linear(ch[0], temb), linear_2=Linear(temb, temb)))

        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(cfg["down_block_types"]):
            cin, cout = cout, ch[i]
            block = nn.ModuleDict(dict(resnets=nn.ModuleList([res(cin if j == 0 else cout, cout) for j in range(layers)])))
            if kind == "CrossAttnDownBlock2D":
                block["attentions"] = nn.ModuleList([attn(cout, heads[i]) for _ in range(layers)])
            if i < n - 1:
                block["downsamplers"] = nn.ModuleList([Downsample(cout, cfg["downsample_padding"])])
            self.down_blocks.append(block)

        scale = cfg.get("mid_block_scale_factor", 1.0)
        self.mid_block = nn.ModuleDict(dict(
            resnets=nn.ModuleList([res(ch[-1], ch[-1], scale), res(ch[-1], ch[-1], scale)]),
            attentions=nn.ModuleList([attn(ch[-1], heads[-1])]),
        ))

        # Each up block takes layers + 1 skip connections: one per down-block resnet plus its downsampler (or conv_in).
        self.up_blocks = nn.ModuleList()
        rch, rheads = ch[::-1], heads[::-1]
        cout = rch[0]
        for i, kind in enumerate(cfg["up_block_types"]):
            prev, cout, skip_last = cout, rch[i], rch[min(i + 1, n - 1)]
            resnets = [res((prev if j == 0 else cout) + (skip_last if j == layers else cout), cout) for j in range(layers + 1)]
            block = nn.ModuleDict(dict(resnets=nn.ModuleList(resnets)))
            if kind == "CrossAttnUpBlock2D":
                block["attentions"] = nn.ModuleList([attn(cout, rheads[i]) for _ in range(layers + 1)])
            if i < n - 1:
                block["upsamplers"] = nn.ModuleList([Upsample(cout)])
            self.up_blocks.append(block)

        self.conv_norm_out = GroupNorm(ch[0], groups, eps)
        self.conv_out = Conv2d(ch[0], cfg["out_channels"], 3, padding=1)
        # Activation checkpointing per down/mid/up block (train.py --grad-checkpoint): only each block's inputs are kept
        # for backward and its inside is recomputed, trading about one more forward for most of the activation memory.
        self.grad_checkpoint = False

    def _down(self, block, h, temb, context):
        """One down block; returns every output that the up blocks take as a skip connection, the last being h."""
        outs = []
        for j, resnet in enumerate(block.resnets):
            h = resnet(h, temb)
            if "attentions" in block:
                h = block.attentions[j](h, context)
            outs.append(h)
        if "downsamplers" in block:
            outs.append(block.downsamplers[0](h))
        return tuple(outs)

    def _mid(self, h, temb, context):
        h = self.mid_block.resnets[0](h, temb)
        h = self.mid_block.attentions[0](h, context)
        return self.mid_block.resnets[1](h, temb)

    def _up(self, block, h, skips, temb, context):
        """One up block; `skips` are its down-block outputs, last first."""
        for j, resnet in enumerate(block.resnets):
            h = resnet(torch.cat([h, skips[j]], dim=1), temb)
            if "attentions" in block:
                h = block.attentions[j](h, context)
        return block.upsamplers[0](h) if "upsamplers" in block else h

    def forward(self, x, timesteps, context):
        # timesteps: a number, a 0-d or a (B,) tensor. Pass tensors under torch.compile: a Python number is a constant
        # to the compiler, so every new timestep value would trigger a recompile.
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        temb = timestep_embedding(t, self.cfg["block_out_channels"][0], self.cfg["flip_sin_to_cos"], self.cfg["freq_shift"])
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb.to(x.dtype))))
        if self.grad_checkpoint and torch.is_grad_enabled():
            run = lambda fn, *args: torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        else:
            run = lambda fn, *args: fn(*args)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            skips += run(self._down, block, h, temb, context)
            h = skips[-1]
        h = run(self._mid, h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = run(self._up, block, h, skips[-n:][::-1], temb, context)
            del skips[-n:]
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# -----------------------------------------------------------------------------
# VAE: images <-> latents, 8x smaller per side for SD v1-4. diffusers: AutoencoderKL.


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, used once in each mid block. diffusers: Attention in UNetMidBlock2D."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = GroupNorm(channels, groups, 1e-6)
        self.to_q, self.to_k, self.to_v = (Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([Linear(channels, channels)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1 head, HW, C)
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + h.transpose(1, 2).reshape(B, C, H, W)


def _vae_mid_block(channels, groups):
    res = lambda: ResnetBlock(channels, channels, groups, 1e-6)
    return nn.ModuleDict(dict(resnets=nn.ModuleList([res(), res()]), attentions=nn.ModuleList([VAEAttention(channels, groups)])))


def _run_mid_block(mid, h):
    return mid.resnets[1](mid.attentions[0](mid.resnets[0](h)))


class VAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ch, layers, groups, latent = cfg["block_out_channels"], cfg["layers_per_block"], cfg["norm_num_groups"], cfg["latent_channels"]
        n = len(ch)
        res = lambda cin, cout: ResnetBlock(cin, cout, groups, 1e-6)

        down_blocks = nn.ModuleList()
        for i in range(n):
            cin = ch[max(i - 1, 0)]
            block = nn.ModuleDict(dict(resnets=nn.ModuleList([res(cin if j == 0 else ch[i], ch[i]) for j in range(layers)])))
            if i < n - 1:
                block["downsamplers"] = nn.ModuleList([Downsample(ch[i], padding=0)])
            down_blocks.append(block)
        self.encoder = nn.ModuleDict(dict(
            conv_in=Conv2d(cfg["in_channels"], ch[0], 3, padding=1),
            down_blocks=down_blocks,
            mid_block=_vae_mid_block(ch[-1], groups),
            conv_norm_out=GroupNorm(ch[-1], groups, 1e-6),
            conv_out=Conv2d(ch[-1], 2 * latent, 3, padding=1),  # mean and log-variance
        ))
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1)

        self.post_quant_conv = Conv2d(latent, latent, 1)
        up_blocks, rch = nn.ModuleList(), ch[::-1]
        for i in range(n):
            cin = rch[max(i - 1, 0)]
            block = nn.ModuleDict(dict(resnets=nn.ModuleList([res(cin if j == 0 else rch[i], rch[i]) for j in range(layers + 1)])))
            if i < n - 1:
                block["upsamplers"] = nn.ModuleList([Upsample(rch[i])])
            up_blocks.append(block)
        self.decoder = nn.ModuleDict(dict(
            conv_in=Conv2d(latent, ch[-1], 3, padding=1),
            mid_block=_vae_mid_block(ch[-1], groups),
            up_blocks=up_blocks,
            conv_norm_out=GroupNorm(ch[0], groups, 1e-6),
            conv_out=Conv2d(ch[0], cfg["out_channels"], 3, padding=1),
        ))

    def encode(self, images):
        """Images in [-1, 1] (B, 3, H, W) -> the mean of the latent Gaussian (B, C, H/f, W/f), unscaled."""
        enc = self.encoder
        h = enc.conv_in(images)
        for block in enc.down_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            if "downsamplers" in block:
                h = block.downsamplers[0](h)
        h = enc.conv_out(F.silu(enc.conv_norm_out(_run_mid_block(enc.mid_block, h))))
        return self.quant_conv(h).chunk(2, dim=1)[0]

    def decode(self, z):
        """Unscaled latents -> images in about [-1, 1]."""
        dec = self.decoder
        h = _run_mid_block(dec.mid_block, dec.conv_in(self.post_quant_conv(z)))
        for block in dec.up_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            if "upsamplers" in block:
                h = block.upsamplers[0](h)
        return dec.conv_out(F.silu(dec.conv_norm_out(h)))


# -----------------------------------------------------------------------------
# CLIP text encoder: token ids -> context for cross-attention. transformers: CLIPTextModel.


class CLIPLayer(nn.Module):
    """Pre-norm causal self-attention + MLP. transformers: CLIPEncoderLayer."""

    def __init__(self, dim, heads, hidden, act):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.ModuleDict({name: Linear(dim, dim) for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict(dict(fc1=Linear(dim, hidden), fc2=Linear(hidden, dim)))
        # quick_gelu is the sigmoid approximation the original CLIP was trained with.
        self.act = (lambda x: x * torch.sigmoid(1.702 * x)) if act == "quick_gelu" else F.gelu

    def forward(self, x):
        B, N, C = x.shape
        a, h = self.self_attn, self.layer_norm1(x)
        q, k, v = (a[p](h).view(B, N, self.heads, C // self.heads).transpose(1, 2) for p in ("q_proj", "k_proj", "v_proj"))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens <= i, as CLIP was trained
        x = x + a.out_proj(h.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class TextEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5)
        layers = [CLIPLayer(d, cfg["num_attention_heads"], cfg["intermediate_size"], cfg["hidden_act"])
                  for _ in range(cfg["num_hidden_layers"])]
        for layer in layers:
            layer.layer_norm1.eps = layer.layer_norm2.eps = eps
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(cfg["vocab_size"], d),
                position_embedding=nn.Embedding(cfg["max_position_embeddings"], d),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(layers))),
            final_layer_norm=nn.LayerNorm(d, eps=eps),
        ))

    def forward(self, input_ids):
        """(B, 77) token ids -> (B, 77, hidden) last hidden state after the final layer norm."""
        tm = self.text_model
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding.weight[: input_ids.shape[1]]
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)


# -----------------------------------------------------------------------------
# Loading and saving the published files


class LoadError(Exception):
    """Weights that cannot be loaded; the message says what is wrong and how to get the right files."""


HOW_TO_GET = "See weights/README.md for the files and the download command."

# Older published files use other names for a few tensors; each rule maps an old key of a component onto ours.
# The text encoder's position_ids is an int64 buffer (0..76) that we compute on the fly instead: dropped.
RENAMES = {
    "unet": [],
    "vae": [
        (r"^(.*mid_block\.attentions\.0)\.query\.", r"\1.to_q."),
        (r"^(.*mid_block\.attentions\.0)\.key\.", r"\1.to_k."),
        (r"^(.*mid_block\.attentions\.0)\.value\.", r"\1.to_v."),
        (r"^(.*mid_block\.attentions\.0)\.proj_attn\.", r"\1.to_out.0."),
    ],
    "text_encoder": [(r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1.")],
}
DROPPED = {"text_model.embeddings.position_ids"}

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors_header(path, renames=()):
    """A safetensors file is an 8-byte little-endian header length, a JSON header, then raw tensor bytes.
    Returns {key: (dtype string, shape, (begin, end))} with offsets relative to the file, checked against its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise LoadError(f"{path} is not a safetensors file or is truncated ({size} bytes). {HOW_TO_GET}")
        try:  # JSON of {name: {dtype, shape, data_offsets}}, and no other shape
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            tensors = {key: (str(info["dtype"]), tuple(map(int, info["shape"])),
                             tuple(8 + n + int(o) for o in info["data_offsets"])) for key, info in header.items()}
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
            raise LoadError(f"{path} has a corrupt safetensors header. Download it again. {HOW_TO_GET}") from None
    entries = {}
    for key, (dtype, shape, (begin, end)) in tensors.items():
        if end > size:
            raise LoadError(f"{path} is truncated: tensor {key} ends at byte {end} but the file has {size} bytes. "
                            f"The download was probably interrupted; fetch it again. {HOW_TO_GET}")
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        entries[key] = (dtype, shape, (begin, end))
    return entries


def load_weights(module, path, dtype, device, renames=(), entries=None, source="its config.json"):
    """Fill every parameter of `module` (built on the meta device) from the safetensors file at `path`, strictly.
    Each tensor is read straight from disk into its final buffer, so the load never holds two copies of the model.
    `entries` (key -> dtype, shape, offsets) picks this module's part of a file holding more (a single-file checkpoint)."""
    entries = dict(entries) if entries is not None else read_safetensors_header(path, renames)
    for key in DROPPED:
        entries.pop(key, None)
    expected = dict(module.state_dict(keep_vars=True))
    unknown = [k for k in entries if k not in expected]
    missing = [k for k in expected if k not in entries]
    # A 1x1 conv and a linear layer hold the same numbers: some files store attention projections either way.
    squeeze = lambda shape: shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape
    wrong = [f"{k}: file {entries[k][1]}, config {tuple(p.shape)}" for k, p in expected.items()
             if k in entries and squeeze(entries[k][1]) != squeeze(tuple(p.shape))]
    bad_dtype = [f"{k}: {entries[k][0]}" for k in expected if k in entries and entries[k][0] not in SAFETENSORS_DTYPES]
    problems = [(unknown, "tensors the model does not have"), (missing, "tensors missing from the file"),
                (wrong, "shapes that do not match the config"), (bad_dtype, "tensors that are not floating point")]
    message = "; ".join(f"{len(keys)} {what} (first: {', '.join(keys[:3])})" for keys, what in problems if keys)
    if message:
        raise LoadError(f"{path} does not match {source}: {message}. Is {source} the one that came with these "
                        f"weights? {HOW_TO_GET}")

    # Allocate the model in its final dtype and device (memory the loop below overwrites, so nothing is initialised).
    module.to(dtype).to_empty(device=device)
    params = dict(module.state_dict(keep_vars=True))
    with open(path, "rb") as f, torch.no_grad():
        for key, param in params.items():
            file_dtype, shape, (begin, end) = entries[key]
            direct = param.device.type == "cpu" and SAFETENSORS_DTYPES[file_dtype] == dtype
            # Same dtype on CPU: bytes go from disk straight into the parameter. Otherwise through a one-tensor buffer.
            raw = param if direct else torch.empty(param.shape, dtype=SAFETENSORS_DTYPES[file_dtype])
            f.seek(begin)
            if f.readinto(raw.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise LoadError(f"{path} ended while reading {key}. Fetch the file again. {HOW_TO_GET}")
            if not direct:
                param.copy_(raw)
    return module


def read_config(path):
    if not path.is_file():
        raise LoadError(f"missing {path}. {HOW_TO_GET}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({e}). {HOW_TO_GET}") from None


def weights_file(folder, name):
    """The full-precision file if present, else the published half-precision variant (name.fp16.safetensors)."""
    for candidate in (folder / f"{name}.safetensors", folder / f"{name}.fp16.safetensors"):
        if candidate.is_file():
            return candidate
    raise LoadError(f"missing {folder / name}.safetensors (or its .fp16 variant). {HOW_TO_GET}")


def check_config(cfg, component, required):
    missing = [k for k in required if k not in cfg]
    if missing:
        raise LoadError(f"{component}/config.json lacks {', '.join(missing)}. {HOW_TO_GET}")


UNSUPPORTED_UNET = {"use_linear_projection": True, "only_cross_attention": True, "upcast_attention": True,
                    "class_embed_type": None, "addition_embed_type": None}


def build(cls, cfg, component):
    """Build a component on the meta device (no memory, no random init): the loader fills it afterwards."""
    required = {
        UNet: ["block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps", "cross_attention_dim",
               "in_channels", "out_channels", "down_block_types", "up_block_types", "attention_head_dim"],
        VAE: ["block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels", "in_channels", "out_channels"],
        TextEncoder: ["hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size",
                      "max_position_embeddings", "hidden_act"],
    }[cls]
    check_config(cfg, component, required)
    if cls is UNet:
        odd = [k for k, v in UNSUPPORTED_UNET.items() if cfg.get(k) and v is not None] + \
              [k for k, v in UNSUPPORTED_UNET.items() if v is None and cfg.get(k) is not None]
        kinds = set(cfg["down_block_types"]) - {"CrossAttnDownBlock2D", "DownBlock2D"} | \
            set(cfg["up_block_types"]) - {"CrossAttnUpBlock2D", "UpBlock2D"}
        if odd or kinds:
            raise LoadError(f"{component}/config.json asks for features of a later SD version that nanoddpo does not "
                            f"implement: {sorted(odd) + sorted(kinds)}. nanoddpo builds SD v1.x UNets.")
    cfg.setdefault("flip_sin_to_cos", True)
    cfg.setdefault("freq_shift", 0)
    cfg.setdefault("downsample_padding", 1)
    try:
        with torch.device("meta"):
            return cls(cfg)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise LoadError(f"{component}/config.json describes a model that cannot be built: {e}") from None


def load_tokenizer(folder):
    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise LoadError(f"missing {folder / name}: the CLIP tokenizer needs vocab.json and merges.txt. {HOW_TO_GET}")
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a malformed file; all mean the same thing here
        raise LoadError(f"cannot read the tokenizer in {folder}: {e}. {HOW_TO_GET}") from None


def save_safetensors(tensors, path, metadata=None):
    """Write atomically: a temp file renamed over the target, so an interrupted save never leaves a half file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # safetensors writes 0600 whatever the umask; a shared weights folder needs 0644
    os.replace(tmp, path)


def save_json(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def is_single_file(path):
    """A checkpoint file rather than a model folder (a folder may have a dot in its name: stable-diffusion-v1.5)."""
    return not Path(path).is_dir() and Path(path).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def resolve_model(path=None):
    """The model the scripts use: `path` if given (a folder or a single .safetensors file; it must exist: never a
    silent fallback), else weights/stable-diffusion-v1-4 when it has been downloaded, else the bundled weights/tiny."""
    if path:
        if is_single_file(path):
            from nanoddpo.single_file import refuse_unsupported
            refuse_unsupported(path)  # it must exist, and be a .safetensors file: never a pickle
        elif Path(path).is_file():  # model_index.json, unet/config.json, ...: the folder was meant
            raise LoadError(f"{path} is a file: give the model folder (or one .safetensors file). {HOW_TO_GET}")
        else:
            check_layout(Path(path))  # said before a run starts, not when the weights load
        return Path(path)
    full = WEIGHTS / "stable-diffusion-v1-4"
    return full if full.is_dir() else WEIGHTS / "tiny"


def check_layout(root):
    """A LoadError unless `root` is a folder in the published layout (the files in each are checked as they load)."""
    if not root.is_dir():
        raise LoadError(f"model folder {root} does not exist. {HOW_TO_GET}")
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        if not (root / name).is_dir():
            raise LoadError(f"{root} has no {name}/ folder: a Stable Diffusion folder holds unet/, vae/, "
                            f"text_encoder/ and tokenizer/. {HOW_TO_GET}")


def fingerprint(unet_cfg):
    """A short id of a UNet architecture, stored with checkpoints so that one is never applied to another base model.
    Same for the fp32 and fp16 files of one model; it cannot tell apart two models of one architecture (v1-4, v1-5)."""
    keys = ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim", "in_channels",
            "sample_size", "down_block_types", "up_block_types", "norm_num_groups")
    return hashlib.sha256(json.dumps({k: unet_cfg.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# The three networks together, with the tokenizer and the latent scaling


COMPONENTS = [  # (folder, weights file stem, class, diffusers/transformers class name written in config.json)
    ("unet", "diffusion_pytorch_model", UNet, "UNet2DConditionModel"),
    ("vae", "diffusion_pytorch_model", VAE, "AutoencoderKL"),
    ("text_encoder", "model", TextEncoder, "CLIPTextModel"),
]


class StableDiffusion(nn.Module):
    def __init__(self, unet_cfg, vae_cfg, text_cfg, tokenizer, init=True):
        """Random init from the three config dicts (init=False builds on the meta device, for the loader to fill)."""
        super().__init__()
        self.tokenizer = tokenizer
        self.unet, self.vae, self.text_encoder = (build(cls, dict(cfg), name) for (name, _, cls, _), cfg
                                                  in zip(COMPONENTS, (unet_cfg, vae_cfg, text_cfg)))
        if init:
            for module in (self.unet, self.vae, self.text_encoder):
                module.to_empty(device="cpu")
                for m in module.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
        self.scaling_factor = vae_cfg.get("scaling_factor", 0.18215)
        self.max_length = text_cfg["max_position_embeddings"]
        f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.latent_shape = (unet_cfg["in_channels"], unet_cfg.get("sample_size", 64), unet_cfg.get("sample_size", 64))
        self.image_size = self.latent_shape[1] * f

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, config=None, ema=True):
        """Load a model folder in the published layout (CompVis/stable-diffusion-v1-4): unet/, vae/, text_encoder/,
        tokenizer/; or a single-file SD 1.x checkpoint (.safetensors, the original layout: see nanoddpo/single_file.py),
        built from SD v1's configs and CLIP's tokenizer (shipped), or from those of the folder `config`. A file with
        EMA weights loads them (ema=False: the trained weights instead)."""
        if is_single_file(path):
            return cls.from_single_file(path, device, dtype, config, ema)
        root = Path(path)
        check_layout(root)
        cfgs = [read_config(root / name / "config.json") for name, *_ in COMPONENTS]
        sd = cls(*cfgs, load_tokenizer(root / "tokenizer"), init=False)
        for name, stem, _, _ in COMPONENTS:
            load_weights(getattr(sd, name), weights_file(root / name, stem), dtype, device, RENAMES[name])
        sd.path, sd.fingerprint = str(root), fingerprint(cfgs[0])
        return sd.eval().requires_grad_(False)

    @classmethod
    def from_single_file(cls, path, device="cpu", dtype=torch.float32, config=None, ema=True):
        from nanoddpo.single_file import SD_V1, clip_tokenizer_folder, refuse_unsupported, split_entries

        refuse_unsupported(path)
        if config:  # a model folder's configs and tokenizer (its weights are not read)
            cfgs = [read_config(Path(config) / name / "config.json") for name, *_ in COMPONENTS]
            tokenizer, source = load_tokenizer(Path(config) / "tokenizer"), f"the configs in {config}"
        else:
            cfgs = [read_config(SD_V1 / f"{name}_config.json") for name, *_ in COMPONENTS]
            tokenizer, source = load_tokenizer(clip_tokenizer_folder()), "SD v1's configs (nanoddpo/configs/sd-v1-4)"
        sd = cls(*cfgs, tokenizer, init=False)
        entries, _ = split_entries(path, sd.unet, sd.vae, ema)
        for name, *_ in COMPONENTS:
            load_weights(getattr(sd, name), path, dtype, device, entries=entries[name], source=f"{source} ({name})")
        sd.path, sd.fingerprint = str(path), fingerprint(cfgs[0])
        return sd.eval().requires_grad_(False)

    def save_pretrained(self, path):
        """Write the published layout, so the folder loads here and in the reference libraries alike."""
        root = Path(path)
        for name, stem, _, class_name in COMPONENTS:
            (root / name).mkdir(parents=True, exist_ok=True)
            module = getattr(self, name)
            save_json({"_class_name": class_name, **module.cfg}, root / name / "config.json")
            save_safetensors(module.state_dict(), root / name / f"{stem}.safetensors", metadata={"format": "pt"})
        # Copy the tokenizer's own files: transformers would rewrite them as tokenizer.json, not the published layout.
        (root / "tokenizer").mkdir(exist_ok=True)
        source = Path(self.tokenizer.name_or_path)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
            if (source / name).is_file() and source.resolve() != (root / "tokenizer").resolve():
                shutil.copyfile(source / name, root / "tokenizer" / name)

    def tokenize(self, prompts):
        """Prompts -> (B, 77) ids: <start> tokens <end> then <end> padding, cut at 77 as SD v1 was trained."""
        full = self.tokenizer(list(prompts)).input_ids
        too_long = [p for p, ids in zip(prompts, full) if len(ids) > self.max_length]
        if too_long:
            warnings.warn(f"{len(too_long)} prompt(s) longer than {self.max_length} tokens were truncated, "
                          f"e.g. {too_long[0][:60]!r}...")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        return ids.to(self.device)

    def encode_prompts(self, prompts):
        return self.text_encoder(self.tokenize(prompts))

    def decode_latents(self, z):
        """Latents as the UNet sees them -> images in [0, 1]. Undo the VAE scaling (0.18215 in SD v1-4) first.
        In chunks of at most 512 x 512 pixels in all (one SD image, 64 of the tiny model's): at 512 px the decoder's
        full-resolution activations take about 0.5-0.9 GB per image, so decoding a sampling batch of 8 at once set
        train.py's peak memory (8.4 GB on an H200 at train batch 1), while one 512 px decode is already 2.5 TFLOP of
        work, so smaller batches cost little time."""
        pixels = z.shape[-2] * z.shape[-1] * (self.image_size // self.latent_shape[-1]) ** 2  # per image
        n = max(1, 2**18 // pixels)
        return torch.cat([(self.vae.decode(x / self.scaling_factor) / 2 + 0.5).clamp(0, 1) for x in z.split(n)])
