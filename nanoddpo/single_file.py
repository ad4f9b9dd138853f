"""
Single-file SD 1.x checkpoints: the original latent-diffusion layout (CompVis/stable-diffusion, the A1111 / ComfyUI
format) read into, and written from, nanoddpo's modules, whose names are those of the published diffusers folders.

One file holds all three networks under three prefixes, and no configs or tokenizer:

    model.diffusion_model.*             the UNet: input_blocks / middle_block / output_blocks, resnets with in_layers /
                                        emb_layers / out_layers / skip_connection, time_embed, out
    first_stage_model.*                 the VAE: encoder.down.N.block.M, mid.block_1 / attn_1 / block_2, decoder.up.N
                                        numbered from the bottom (the reverse of up_blocks), nin_shortcut, norm_out;
                                        the mid attention's q / k / v / proj_out are 1x1 convs [C, C, 1, 1]
    cond_stage_model.transformer.*      the CLIP text encoder under transformers' own names
    model_ema.*, betas, alphas_cumprod, ...   EMA copies and the training noise schedule (see EMA below)

The mapping is a table of module prefixes (ours -> original), generated from the UNet and VAE configs, so it works for
any SD 1.x size, the tiny test models included. Parameter names below a module (to_q, norm1, ...) are the same on both
sides unless the table says otherwise. `python -m nanoddpo.single_file FILE` prints what a file holds.

EMA. latent-diffusion training files keep two UNets: `model.diffusion_model.*`, the trained weights, and `model_ema.*`
(the same names with the dots removed: `model_ema.diffusion_modelinput_blocks00weight`), their exponential moving
average, which is what the original sampling scripts use and what the published diffusers folders of SD v1-4 and v1-5
were converted from. Files pruned to one UNet (sd-v1-4.ckpt, v1-5-pruned-emaonly) store the EMA weights under
`model.diffusion_model.*`. So nanoddpo reads `model_ema.*` when a file has it (ema=True, the default) and
`model.diffusion_model.*` otherwise; ema=False reads the trained weights of a file with both. (diffusers'
from_single_file does the opposite by default: extract_ema=False.)
"""
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from nanoddpo.model import (RENAMES, LoadError, VAE, UNet, build, read_config, read_safetensors_header,
                            save_safetensors)
from nanoddpo.world import bytes_to_unicode

CONFIGS = Path(__file__).resolve().parent / "configs"
SD_V1 = CONFIGS / "sd-v1-4"  # SD v1-4's published configs; v1-1 ... v1-5 and their fine-tunes share them

UNET, VAE_PREFIX, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
EMA = "model_ema."
# Buffers of the training objective in latent-diffusion's DDPM class (its noise schedule) and the EMA's bookkeeping:
# present in most files, used by nothing here (nanoddpo/ddim.py computes the schedule from scheduler_config.json).
IGNORED = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
           "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
           "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
           "lvlb_weights", "logvar", "model_ema.decay", "model_ema.num_updates"}

PICKLES = (".ckpt", ".pt", ".pth", ".bin")
REFUSE_PICKLE = (
    "{path} is a pickle: loading one runs whatever code it carries, so nanoddpo reads only .safetensors files. "
    "Convert it once, in an environment you trust, with:\n"
    "    python -c \"import sys, torch; from safetensors.torch import save_file; "
    "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, sys.argv[2])\" "
    "{path} {stem}.safetensors\n"
    "If weights_only=True refuses the file (it holds Python objects besides tensors), weights_only=False runs its "
    "code: use it only on a file you trust. Most models also publish a .safetensors version: download that instead.")

LATER_VERSIONS = {  # a key prefix only a later SD version has -> what it is
    "cond_stage_model.model.": "SD 2.x (its OpenCLIP text encoder, cond_stage_model.model.*)",
    "conditioner.embedders.": "SDXL (its two text encoders, conditioner.embedders.*)",
}

# -----------------------------------------------------------------------------
# The mapping: module prefixes, ours (diffusers' names) -> original


RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
RESNET_VAE = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _add(table, ours, original, inner=None):
    """One module: its prefix, plus the renamed submodules under it."""
    table[ours] = original
    for a, b in (inner or {}).items():
        table[f"{ours}.{a}"] = f"{original}.{b}"


def unet_table(cfg):
    """Module prefixes of the UNet. The original numbers its blocks in one flat list each way: input_blocks 0 is
    conv_in, then per level `layers` of (resnet, attention) and one downsampler; output_blocks per level `layers + 1`
    of (resnet, attention, upsampler). SD v1-4: down_blocks.1.attentions.0 = input_blocks.4.1."""
    layers, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    t = {}
    _add(t, "conv_in", "input_blocks.0.0")
    _add(t, "time_embedding.linear_1", "time_embed.0")
    _add(t, "time_embedding.linear_2", "time_embed.2")
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            _add(t, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", RESNET_UNET)
            if kind.startswith("CrossAttn"):
                _add(t, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1")
        if i < n - 1:
            _add(t, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op")
    _add(t, "mid_block.resnets.0", "middle_block.0", RESNET_UNET)
    _add(t, "mid_block.attentions.0", "middle_block.1")
    _add(t, "mid_block.resnets.1", "middle_block.2", RESNET_UNET)
    for i, kind in enumerate(cfg["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            _add(t, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", RESNET_UNET)
            if attention:
                _add(t, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1")
        if i < n - 1:  # the upsampler sits after the last resnet (and its attention) of the level
            _add(t, f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if attention else 1}.conv")
    _add(t, "conv_norm_out", "out.0")
    _add(t, "conv_out", "out.2")
    return t


def vae_table(cfg):
    """Module prefixes of the VAE. The decoder's levels are numbered from the lowest resolution in ours (up_blocks.0
    is 64 x 64 latents' first level) and from the highest in the original (up.0 is the last level run)."""
    layers, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    t = {}
    for part in ("encoder", "decoder"):
        _add(t, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", RESNET_VAE)
        _add(t, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
        _add(t, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", RESNET_VAE)
        _add(t, f"{part}.conv_norm_out", f"{part}.norm_out")
    for i in range(n):
        for j in range(layers):
            _add(t, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", RESNET_VAE)
        for j in range(layers + 1):
            _add(t, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", RESNET_VAE)
        if i < n - 1:
            _add(t, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
            _add(t, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv")
    return t  # conv_in, conv_out, quant_conv and post_quant_conv keep their names


def original_key(key, table):
    """Our key -> the original one, by the longest module prefix in `table` (none: the name is the same)."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return ".".join([table[prefix], *parts[n:]])
    return key


def ema_key(key):
    """model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight."""
    return EMA + "".join(key.split(".")[1:])


def original_names(unet, vae):
    """{our key: file key} for the UNet and for the VAE, built from their configs."""
    unet_t, vae_t = unet_table(unet.cfg), vae_table(vae.cfg)
    return ({k: UNET + original_key(k, unet_t) for k in unet.state_dict()},
            {k: VAE_PREFIX + original_key(k, vae_t) for k in vae.state_dict()})


# -----------------------------------------------------------------------------
# Reading


def refuse_unsupported(path):
    path = Path(path)
    if path.suffix.lower() in PICKLES:
        raise LoadError(REFUSE_PICKLE.format(path=path, stem=path.with_suffix("")))
    if path.is_dir():
        raise LoadError(f"{path} is a folder: give a single .safetensors file here (--model takes a folder as it is)")
    if not path.is_file():
        raise LoadError(f"model file {path} does not exist. See weights/README.md for single-file SD 1.x checkpoints.")


def split_entries(path, unet, vae, ema=True):
    """Read a single file's header and sort its tensors into {component: {our key: (dtype, shape, offsets)}}, the form
    load_weights takes. Strict: every tensor lands in a component or is one of the explicitly ignored kinds; a tensor
    the mapping does not know stays under its file name, so the loader reports it as one the model does not have."""
    header = read_safetensors_header(path)
    later = [what for prefix, what in LATER_VERSIONS.items() if any(k.startswith(prefix) for k in header)]
    if later:
        raise LoadError(f"{path} is an {later[0]} checkpoint; nanoddpo builds SD v1.x only (v1-1 ... v1-5 and their "
                        f"fine-tunes). See weights/README.md.")
    unet_names, vae_names = original_names(unet, vae)
    has_ema = any(k.startswith(EMA) and k not in IGNORED for k in header)
    if ema and has_ema:
        unet_names = {k: ema_key(v) for k, v in unet_names.items()}
    ours = {v: ("unet", k) for k, v in unet_names.items()} | {v: ("vae", k) for k, v in vae_names.items()}
    unused_unet = UNET if ema and has_ema else EMA  # the UNet copy not chosen
    entries = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, entry in header.items():
        if key in ours:
            component, name = ours[key]
            entries[component][name] = entry
        elif key.startswith(TEXT):
            entries["text_encoder"][_text_name(key.removeprefix(TEXT))] = entry
        elif key in IGNORED or key.startswith(unused_unet):
            continue
        else:
            component = "vae" if key.startswith(VAE_PREFIX) else "unet"
            entries[component][key] = entry  # unknown: load_weights names it
    return entries, has_ema


def _text_name(key):
    for pattern, repl in RENAMES["text_encoder"]:  # files written with older transformers lack "text_model."
        key = re.sub(pattern, repl, key)
    return key


# -----------------------------------------------------------------------------
# CLIP's tokenizer, which no single file carries


def clip_tokenizer_folder(cache=None):
    """A folder holding CLIP's tokenizer (vocab.json, merges.txt, tokenizer_config.json) as in SD's tokenizer/ folder,
    built once from the merge list shipped in nanoddpo/configs/clip-tokenizer/ and cached.

    vocab.json is 49,408 tokens: the 256 byte symbols in GPT-2's order (bytes_to_unicode sorted by code point: the
    printable bytes "!" ... "ÿ" first, then the 68 shifted ones), the same 256 with "</w>", the 48,894 merges joined,
    then <|startoftext|> (49406) and <|endoftext|> (49407). So "a</w>" is 256 + 64 = 320."""
    cache = Path(cache or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoddpo" / "clip-tokenizer"
    if (cache / "vocab.json").is_file():
        return cache
    merges_text = gzip.decompress((CONFIGS / "clip-tokenizer" / "merges.txt.gz").read_bytes()).decode("utf-8")
    merges = [line.split() for line in merges_text.splitlines()[1:]]  # line 0: "#version: 0.2"
    alphabet = sorted(bytes_to_unicode().values(), key=ord)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == len(set(tokens)) == 49408, "the shipped merge list is not CLIP's"
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>"}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent))  # built aside and renamed: a concurrent reader never sees half
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    (tmp / "merges.txt").write_text(merges_text, "utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tmp.chmod(0o755)
    try:
        os.rename(tmp, cache)
    except OSError:  # another process built it first
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return cache


# -----------------------------------------------------------------------------
# Writing


def save_single_file(sd, path, metadata=None):
    """Write sd's three networks as one file in the original layout (what the SD UIs and diffusers' from_single_file
    read). The VAE's mid attention projections are written as the 1x1 convs [C, C, 1, 1] the original stores."""
    unet_names, vae_names = original_names(sd.unet, sd.vae)
    tensors = {unet_names[k]: v for k, v in sd.unet.state_dict().items() if ".lora_" not in k}
    for k, v in sd.vae.state_dict().items():
        is_attention = ".attn_1." in vae_names[k] and v.ndim == 2
        tensors[vae_names[k]] = v[:, :, None, None] if is_attention else v
    tensors |= {TEXT + k: v for k, v in sd.text_encoder.state_dict().items()}
    save_safetensors(tensors, path, metadata={"format": "pt", **(metadata or {})})


def main(argv):
    """`python -m nanoddpo.single_file FILE`: what the file holds, network by network."""
    from nanoddpo.cli import Parser
    parser = Parser(description="What a single-file SD 1.x checkpoint holds, network by network, and whether it has "
                    "an EMA copy (the one nanoddpo reads).")
    parser.add_argument("file", help="a .safetensors file in the original SD 1.x layout")
    path = parser.parse_args(argv).file
    refuse_unsupported(path)
    cfgs = [read_config(SD_V1 / f"{name}_config.json") for name in ("unet", "vae")]
    entries, has_ema = split_entries(path, build(UNet, cfgs[0], "unet"), build(VAE, cfgs[1], "vae"))
    for name, found in entries.items():
        print(f"{name}: {len(found)} tensors")
    print("EMA copy present: reading model_ema.*" if has_ema else "one UNet copy: model.diffusion_model.*")


if __name__ == "__main__":
    from nanoddpo.cli import run
    run("nanoddpo.single_file", lambda: main(sys.argv[1:]))
