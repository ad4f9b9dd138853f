"""
Export a trained checkpoint for use outside nanoddpo.

    python -m nanoddpo.export runs/<name> --out exported/            # the run's latest checkpoint
    python -m nanoddpo.export runs/<name> --step 200 --out exported/ --single-file

- A LoRA run becomes one file, exported/<name>-step<N>-lora.safetensors, in kohya's layout for SD 1.x, which the SD
  UIs (A1111, ComfyUI) and diffusers' load_lora_weights all read: for each adapted layer, named by its module path in
  the diffusers UNet (what kohya's sd-scripts train SD 1.x on) with dots as underscores,
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   A (rank x in)
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     B (out x rank)
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              alpha, a scalar
  Readers apply W + (alpha / rank) B A; nanoddpo trains W + B A (nanoddpo/lora.py), so alpha = rank and the scale is 1.
  (The UIs also accept original-layout paths, lora_unet_input_blocks_1_1_..., but diffusers' SD 1.x loader does not.)
    diffusers:  pipe.load_lora_weights("exported", weight_name="<name>-step<N>-lora.safetensors")
    ComfyUI / A1111:  copy the file into models/loras/ (ComfyUI) or models/Lora/ (A1111)
- A full fine-tuning run becomes a diffusers-format model folder, exported/<name>-step<N>/ (model_index.json, every
  config, the trained UNet, the base model's VAE, text encoder and tokenizer, the scheduler config), which
  StableDiffusionPipeline.from_pretrained opens and nanoddpo's --model reads; with --single-file also one file in the
  original layout, exported/<name>-step<N>.safetensors (nanoddpo/single_file.py's mapping), for the SD UIs.

The base model is the one the run trained from (its state.json), or --model.
"""
import json
import shutil
from pathlib import Path

import torch

from nanoddpo.checkpoint import apply_checkpoint, checkpoints_of, readable, trained_base
from nanoddpo.cli import Parser, check_output, number, run
from nanoddpo.model import LoadError, StableDiffusion, save_json, save_safetensors
from nanoddpo.single_file import SD_V1, save_single_file

# What the published model_index.json of SD v1-4 lists, less the safety checker and its feature extractor, which
# nanoddpo neither reads nor writes ([null, null] is how diffusers writes a component that is absent).
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def find_checkpoint(run, step=None):
    ckpts = checkpoints_of(run)
    if not ckpts:
        raise LoadError(f"{run} holds no checkpoints (expected {Path(run) / 'checkpoints' / 'step_<N>'})")
    if step is None:
        return ckpts[-1]
    chosen = [c for c in ckpts if c.name == f"step_{step}"]
    if not chosen:
        raise LoadError(f"{run} has no checkpoint at step {step}; it has: {', '.join(c.name for c in ckpts)}")
    return chosen[0]


def kohya_lora(lora):
    """nanoddpo's LoRA tensors ({layer}.lora_A.weight, lora_B.weight; layers under the published diffusers names) ->
    kohya's ({lora_unet_<layer with dots as underscores>}.lora_down.weight, .lora_up.weight, .alpha).
    Returns (tensors, rank)."""
    out, ranks = {}, set()
    for key, A in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key.removesuffix(".lora_A.weight")
        name = "lora_unet_" + layer.replace(".", "_")
        out[f"{name}.lora_down.weight"] = A
        out[f"{name}.lora_up.weight"] = lora.get(f"{layer}.lora_B.weight")
        out[f"{name}.alpha"] = torch.tensor(float(A.shape[0]))  # alpha / rank = 1: nanoddpo's W + B A
        ranks.add(A.shape[0])
    if len(ranks) != 1 or 2 * len(out) != 3 * len(lora):  # each layer: A and B in, down, up and alpha out
        raise LoadError(f"not a nanoddpo LoRA: ranks {sorted(ranks)}, {len(lora)} tensors")
    return out, ranks.pop()


def write_diffusers_folder(sd, out, scheduler_config):
    """sd as a folder that diffusers' StableDiffusionPipeline.from_pretrained opens (and nanoddpo reads)."""
    out = Path(out)
    sd.save_pretrained(out)
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copyfile(scheduler_config, out / "scheduler" / "scheduler_config.json")
    save_json(MODEL_INDEX, out / "model_index.json")


def export(run, out, step=None, base=None, single_file=False):
    """Write the run's checkpoint (the latest, or step `step`) under `out`; returns the paths written."""
    ckpt = find_checkpoint(run, step)
    with readable(ckpt):  # damaged or missing: one line naming the checkpoint
        trained_on = None if base else json.loads((ckpt / "state.json").read_text())["base_model"]
    base = base or trained_on
    label = f"{Path(run).resolve().name}-{ckpt.name.replace('_', '')}"  # <name>-step<N>
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (ckpt / "lora.safetensors").is_file():
        from safetensors.torch import load_file

        with readable(ckpt):
            tensors, rank = kohya_lora(load_file(ckpt / "lora.safetensors"))
        path = out / f"{label}-lora.safetensors"
        # kohya's metadata keys, which the UIs show: rank ("network_dim") and alpha
        save_safetensors(tensors, path, metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                                                  "ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                                                  "nanoddpo_base_model": str(base)})
        print(f"wrote {path}: LoRA on {len(tensors) // 3} attention projections, rank {rank}, alpha {rank} (scale 1)")
        return [path]
    sd = StableDiffusion.from_pretrained(trained_base(base, f"{ckpt} was") if trained_on else base)
    apply_checkpoint(sd, ckpt)
    folder = out / label
    scheduler = Path(base) / "scheduler" / "scheduler_config.json"
    write_diffusers_folder(sd, folder, scheduler if scheduler.is_file() else SD_V1 / "scheduler_config.json")
    print(f"wrote {folder}/: a diffusers-format model folder (trained UNet, {base}'s VAE, text encoder and tokenizer)")
    written = [folder]
    if single_file:
        written.append(out / f"{label}.safetensors")
        save_single_file(sd, written[-1])
        print(f"wrote {written[-1]}: the same model as one file in the original SD layout")
    return written


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder, runs/<name>")
    parser.add_argument("--step", type=number(int), help="the checkpoint's step (default: the latest)")
    parser.add_argument("--out", required=True, help="folder to write into")
    parser.add_argument("--single-file", action="store_true", help="full fine-tuning: also one original-layout file")
    parser.add_argument("--model", help="the base model (default: the one in the checkpoint's state.json)")

    def checked_export():
        args = parser.parse_args(argv)
        check_output(args.out, "out")  # before a full model is loaded and rebuilt
        return export(args.run, args.out, args.step, args.model, args.single_file)
    return run("nanoddpo.export", checked_export)


if __name__ == "__main__":
    main()
