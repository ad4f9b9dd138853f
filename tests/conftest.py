"""Shared fixtures: tiny random Stable Diffusion models in the published layout, built in seconds on CPU."""
import os
import runpy
import sys

# One thread per process: the tests' models are tiny, and on a 2-core machine two OpenMP threads contending with any
# other process (a subprocess under test, a second rank) run 10-100x slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from nanoddpo.model import StableDiffusion, load_tokenizer
from nanoddpo.world import write_tokenizer

torch.set_num_threads(1)

# The same architecture as SD v1-4 (see nanoddpo/configs/sd-v1-4/), shrunk: 2 UNet levels, 2 VAE levels, 2 text layers.
TINY_UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 2, "norm_num_groups": 8,
    "norm_eps": 1e-5, "cross_attention_dim": 32, "in_channels": 4, "out_channels": 4, "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "center_input_sample": False,
    "mid_block_scale_factor": 1,
}
TINY_VAE = {
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
    "in_channels": 3, "out_channels": 3, "act_fn": "silu", "sample_size": 16, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
}
TINY_TEXT = {
    "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,  # overwritten with the tokenizer's ids below
}


def make_tiny_sd(tmp_path, seed=0):
    vocab_size = write_tokenizer(tmp_path / "tok", words=("a", "red", "cat"))
    tokenizer = load_tokenizer(tmp_path / "tok")
    text = dict(TINY_TEXT, vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    sd = StableDiffusion(TINY_UNET, TINY_VAE, text, tokenizer)
    # Default init leaves the output convs tiny; scale everything up a little so outputs are far from zero
    # and relative errors in parity tests measure real agreement.
    with torch.no_grad():
        for p in sd.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sd


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random SD model folder in the published layout."""
    root = tmp_path_factory.mktemp("tiny_sd")
    make_tiny_sd(root).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture
def command_line(capsys, monkeypatch):
    """Run a script's __main__ as the shell would, minus starting Python: command_line("train.py", [flags]) returns
    (exit status, stderr). A script that ends without sys.exit returns status 0."""
    def run(script, argv):
        monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
        err = capsys.readouterr().err
        return (code if isinstance(code, int) else 1), err + (code if isinstance(code, str) else "")
    return run
