"""
LoRA (Hu et al. 2021, arXiv 2106.09685) on the UNet's attention projections, in a few lines.

Each of to_q, to_k, to_v and to_out.0 of every attention (self and cross) becomes W x + B A x with A (rank x in) and
B (out x rank): B starts at zero, so the fine-tuned model starts exactly at the base model. With rank 4 on SD v1-4 that
is about 0.8 M trainable parameters instead of 860 M. The base weights keep their published key names; the LoRA tensors
are `<layer>.lora_A.weight` and `<layer>.lora_B.weight`, saved alone in lora.safetensors.

    add_lora(unet, rank=4)               # then train lora_parameters(unet)
    with lora_off(unet): ...             # the base model, without a second copy
    save_safetensors(lora_state_dict(unet), "lora.safetensors")
    apply_lora_file(unet, "lora.safetensors")
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from nanoddpo.cli import UsageError
from nanoddpo.model import Linear

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(Linear):
    """model.Linear plus a low-rank update; keeps `weight` and `bias` so the base keys stay as published."""

    def forward(self, x):
        # lora_scale is 1, or 0 inside lora_off(): out + 0 is exactly the base Linear. A tensor, not a Python flag,
        # so that torch.compile reuses one graph for the policy and the base model instead of compiling each. It scales
        # B (out x rank), not the (tokens x out) activation: no extra pass over the activations on the hot path.
        return super().forward(x) + F.linear(self.lora_A(x), self.lora_scale * self.lora_B.weight)


def add_lora(unet, rank=4):
    """Turn every attention projection of the UNet into a LoRALinear, in place. Returns the UNet."""
    targets = [module for name, module in unet.named_modules()
               if any(name.endswith("." + t) for t in TARGETS) and ".attn" in name and type(module) is Linear]
    narrowest = min((min(m.in_features, m.out_features) for m in targets), default=rank)
    if rank > narrowest:  # B A would have no more directions than W itself: only more parameters
        raise UsageError(f"--lora-rank {rank}: must be at most {narrowest}, this UNet's narrowest attention projection")
    for module in targets:
        module.__class__ = LoRALinear  # same parameters, one more term in forward
        device = module.weight.device
        module.lora_A = nn.Linear(module.in_features, rank, bias=False, device=device)
        module.lora_B = nn.Linear(rank, module.out_features, bias=False, device=device)
        nn.init.normal_(module.lora_A.weight, std=1 / rank)
        nn.init.zeros_(module.lora_B.weight)
        module.register_buffer("lora_scale", torch.ones((), device=device), persistent=False)
        module.register_buffer("lora_zero", torch.zeros((), device=device), persistent=False)
    return unet


@contextmanager
def lora_off(unet):
    """Run the base model: inside this block every LoRA layer of `unet` computes W x alone. No copy of the UNet is
    made, and the output is bit for bit the published weights' output (what the KL to the base model needs)."""
    layers = [m for m in unet.modules() if isinstance(m, LoRALinear)]
    one = [m.lora_scale for m in layers]
    for m in layers:  # another tensor, not fill_(0): a graph being trained may have saved the 1 for its backward;
        m.lora_scale = m.lora_zero  # always the same one: CUDA graphs see two fixed addresses, not a new one per call
    try:
        yield unet
    finally:
        for m, scale in zip(layers, one):
            m.lora_scale = scale


def lora_parameters(unet):
    return [p for name, p in unet.named_parameters() if ".lora_" in name]


def lora_state_dict(unet):
    return {k: v for k, v in unet.state_dict().items() if ".lora_" in k}


def apply_lora_file(unet, path):
    """Add LoRA layers of the file's rank to the UNet and load them; every tensor must find its place."""
    tensors = load_file(str(path))
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{path} is not a nanoddpo LoRA file (LoRA ranks found: {sorted(ranks)})")
    add_lora(unet, rank=ranks.pop())
    expected = lora_state_dict(unet)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in tensors):
        raise ValueError(f"{path} does not fit this UNet: it was trained on a different base model")
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)
    return unet
