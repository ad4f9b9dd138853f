"""The model stack (nanoddpo/model.py): tokenization, parity with the reference libraries, strict loading, bad files."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nanoddpo.model import LoadError, StableDiffusion, resolve_model
from conftest import TINY_UNET, TINY_VAE


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def sd(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


# --- tokenization --------------------------------------------------------------------------------------------------

def test_tokenize_pads_and_truncates_like_sd(sd):
    tok = sd.tokenizer
    ids = sd.tokenize(["a red cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :5].tolist() == [tok.bos_token_id, *tok("a red cat", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert (ids[0, 5:] == tok.pad_token_id).all() and ids[1, 0] == tok.bos_token_id
    with pytest.warns(UserWarning, match="truncated"):
        long_ids = sd.tokenize(["cat " * 100])
    assert long_ids.shape == (1, 77) and long_ids[0, -1] == tok.eos_token_id


# --- parity with the reference implementations (float32) ----------------------------------------------------------

def test_text_encoder_matches_transformers(sd, layers):
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = CLIPTextModel(CLIPTextConfig(**sd.text_encoder.cfg)).eval()
    ours = sd.text_encoder.state_dict()
    if "text_model.final_layer_norm.weight" not in ref.state_dict():  # transformers 5 dropped the prefix in memory
        ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
    ref.load_state_dict(ours)
    ids = sd.tokenize(["a red cat", "cat", ""])
    with torch.no_grad():
        assert rel_err(sd.text_encoder(ids), ref(ids).last_hidden_state) < 1e-5


@pytest.fixture(params=["torch layers", "oneDNN layers"])
def layers(request, monkeypatch):
    """Run a test twice: as the tiny model runs (every layer is torch's own), and with every Linear and Conv2d forced
    onto the CPU paths that SD's wide layers take (nanoddpo/cpu_layers.py: oneDNN's matmuls and kept blocked weights)."""
    from nanoddpo import cpu_layers as model

    blocked = request.param == "oneDNN layers"
    if blocked and not model._onednn:
        pytest.skip("this torch build has no oneDNN")
    for layer in (model.Linear, model.Conv2d):
        monkeypatch.setattr(layer, "blocked_min_features", 0 if blocked else 10**9)
    return blocked


def test_unet_matches_diffusers(sd, layers):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    ref.load_state_dict(sd.unet.state_dict())
    torch.manual_seed(0)
    x, context = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    with torch.no_grad():
        for t in (torch.tensor([981, 500, 1]), torch.tensor(421), 21):  # (B,), 0-d and Python number
            assert rel_err(sd.unet(x, t, context), ref(x, t, context).sample) < 1e-5
    # The frozen UNet's gradient to its inputs (LoRA training backpropagates through every frozen layer)
    x.requires_grad_(True)
    context.requires_grad_(True)
    t = torch.tensor([981, 500, 1])
    grads = [torch.autograd.grad(unet(x, t, context).pow(2).sum(), (x, context))
             for unet in (sd.unet, lambda *a: ref(*a).sample)]
    for ours, theirs in zip(*grads):
        assert rel_err(ours, theirs) < 1e-5


def test_vae_matches_diffusers(sd, layers):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKL(**TINY_VAE).eval()
    ref.load_state_dict(sd.vae.state_dict())
    torch.manual_seed(0)
    images, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(sd.vae.encode(images), ref.encode(images).latent_dist.mean) < 1e-5
        assert rel_err(sd.vae.decode(z), ref.decode(z).sample) < 1e-5
        out = sd.decode_latents(z)
    assert out.min() >= 0 and out.max() <= 1 and out.shape == (2, 3, 16, 16)


def test_decode_latents_in_chunks_of_one_sd_image(sd, monkeypatch):
    """Large images decode in chunks of at most 512 x 512 pixels in all (the peak-memory fix), every image in order;
    small ones in one batch, bit for bit as before. The VAE is replaced by a cheap stand-in that records its calls."""
    torch.manual_seed(0)
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(sd.decode_latents(z), (sd.vae.decode(z / sd.scaling_factor) / 2 + 0.5).clamp(0, 1))
    calls = []
    monkeypatch.setattr(sd.vae, "decode", lambda x: calls.append(len(x)) or x[:, :3])
    f = sd.image_size // sd.latent_shape[-1]
    for side, chunks in ((512, [1] * 5), (320, [2, 2, 1]), (256, [4, 1]), (128, [5])):
        calls.clear()
        z = torch.randn(5, 4, side // f, side // f) * sd.scaling_factor
        out = sd.decode_latents(z)
        assert calls == chunks, side
        assert torch.equal(out, (z[:, :3] / sd.scaling_factor / 2 + 0.5).clamp(0, 1))  # each image in its own place


def test_every_norm_layer_has_the_reference_libraries_eps(sd):
    """Each GroupNorm and LayerNorm has the eps (and groups) of the module under the same name in diffusers' UNet and
    VAE and transformers' CLIP text model. The transformers' GroupNorm at eps 1e-5 instead of 1e-6 moves the UNet's
    output by less than the parity tests' 1e-5 on their inputs, but not on every input: a group of small variance."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel

    refs = {"unet": diffusers.UNet2DConditionModel(**TINY_UNET), "vae": diffusers.AutoencoderKL(**TINY_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**sd.text_encoder.cfg))}
    for name, ref in refs.items():
        theirs = dict(ref.named_modules())
        norms = [(k, m) for k, m in getattr(sd, name).named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        assert len(norms) >= 5  # two text layers of two norms and the final one, at the fewest
        for key, ours in norms:
            other = theirs[key] if key in theirs else theirs[key.removeprefix("text_model.")]  # transformers 5
            assert isinstance(other, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and ours.eps == other.eps, (name, key)
            assert getattr(ours, "num_groups", None) == getattr(other, "num_groups", None), (name, key)


def test_vae_config_without_scaling_factor_takes_diffusers_default(sd):
    """SD v1-4's vae/config.json was published before diffusers added scaling_factor; such a config gets the value
    diffusers' AutoencoderKL gives it, the factor SD v1 was trained with."""
    diffusers = pytest.importorskip("diffusers")
    old = {k: v for k, v in TINY_VAE.items() if k != "scaling_factor"}
    built = StableDiffusion(sd.unet.cfg, old, sd.text_encoder.cfg, sd.tokenizer, init=False)
    assert built.scaling_factor == diffusers.AutoencoderKL(**old).config.scaling_factor


def test_image_size_is_what_the_vae_decodes(sd):
    """sd.image_size (the side sample() and the rewards see) is the side of the VAE's decoded latent_shape."""
    with torch.no_grad():
        assert sd.vae.decode(torch.zeros(1, *sd.latent_shape)).shape == (1, 3, sd.image_size, sd.image_size)


# --- loading: every published naming, every dtype ------------------------------------------------------------------

def test_round_trip_is_exact(sd, tiny_model_dir, tmp_path):
    sd.save_pretrained(tmp_path / "again")
    again = StableDiffusion.from_pretrained(tmp_path / "again")
    for a, b in zip(sd.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_legacy_vae_attention_names_and_text_encoder_without_prefix(sd, tiny_model_dir, tmp_path):
    root = copy_model(tiny_model_dir, tmp_path / "old")
    vae_file = root / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(vae_file).items():
        for new, old in legacy.items():
            if "mid_block.attentions" in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[..., None, None] if value.ndim == 2 else value  # the oldest files stored 1x1 convs
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, vae_file)
    te_file = root / "text_encoder" / "model.safetensors"
    te = {k.removeprefix("text_model."): v for k, v in load_file(te_file).items()}
    te["embeddings.position_ids"] = torch.arange(77)[None]
    save_file(te, te_file)

    old = StableDiffusion.from_pretrained(root)
    for a, b in zip(sd.state_dict().values(), old.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_variant_files(sd, tiny_model_dir, tmp_path, dtype):
    root = copy_model(tiny_model_dir, tmp_path / "fp16")
    for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        full = root / name / f"{stem}.safetensors"
        save_file({k: v.half() for k, v in load_file(full).items()}, root / name / f"{stem}.fp16.safetensors")
        full.unlink()
    half = StableDiffusion.from_pretrained(root, dtype=dtype)
    assert half.dtype == dtype and all(p.dtype == dtype for p in half.parameters())
    w, w_half = sd.unet.conv_in.weight, half.unet.conv_in.weight
    assert torch.equal(w_half, w.half().to(dtype))


# --- bad inputs: a short, clear error naming what is wrong ----------------------------------------------------------

def test_missing_path_and_folders(tiny_model_dir, tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        StableDiffusion.from_pretrained(tmp_path / "nowhere")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):  # each named, before any weights load or a run starts
        root = copy_model(tiny_model_dir, tmp_path / f"no_{part}")
        shutil.rmtree(root / part)
        for load in (StableDiffusion.from_pretrained, resolve_model):
            with pytest.raises(LoadError, match=f"has no {part}/ folder: a Stable Diffusion folder holds unet/, vae/"):
                load(str(root))


def test_truncated_unet_file(tiny_model_dir, tmp_path):
    root = copy_model(tiny_model_dir, tmp_path / "cut")
    f = root / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LoadError, match="truncated.*unet"):
        StableDiffusion.from_pretrained(root)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(LoadError, match="not a safetensors file"):
        StableDiffusion.from_pretrained(root)
    for header in (b"[1, 2, 3]", b'{"a": {"dtype": "F32"}}', b'{"a": 5}'):  # JSON, but not a header's shape
        f.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(LoadError, match="has a corrupt safetensors header"):
            StableDiffusion.from_pretrained(root)
    (root / "vae" / "config.json").write_bytes(b"\xff\xfe not UTF-8")
    with pytest.raises(LoadError, match="config.json is not valid JSON"):
        StableDiffusion.from_pretrained(root)


def test_extra_unknown_tensor(tiny_model_dir, tmp_path):
    root = copy_model(tiny_model_dir, tmp_path / "extra")
    f = root / "text_encoder" / "model.safetensors"
    tensors = load_file(f)
    tensors["text_model.mystery.weight"] = torch.zeros(3)
    save_file(tensors, f)
    with pytest.raises(LoadError, match=r"text_encoder.*1 tensors the model does not have \(first: text_model.mystery"):
        StableDiffusion.from_pretrained(root)


def test_config_with_wrong_channels(tiny_model_dir, tmp_path):
    root = copy_model(tiny_model_dir, tmp_path / "wrongcfg")
    cfg = json.loads((root / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [64, 64]
    (root / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="shapes that do not match the config.*conv_in.weight"):
        StableDiffusion.from_pretrained(root)


def test_tokenizer_missing_merges(tiny_model_dir, tmp_path):
    root = copy_model(tiny_model_dir, tmp_path / "nomerges")
    (root / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(LoadError, match="merges.txt"):
        StableDiffusion.from_pretrained(root)


# --- ready for speed ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_unet_compiles_fullgraph(sd):
    compiled = torch.compile(sd.unet, fullgraph=True)
    x, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([981, 1])
    with torch.no_grad():
        assert rel_err(compiled(x, t, context), sd.unet(x, t, context)) < 1e-5


def test_grad_checkpoint_gives_the_same_output_and_gradients(sd):
    """unet.grad_checkpoint recomputes each block in backward instead of storing it: same numbers, less memory."""
    torch.manual_seed(0)
    x, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([981, 1])
    unet = sd.unet.requires_grad_(True)
    results, saved = [], []
    for checkpointing in (False, True):
        unet.grad_checkpoint = checkpointing
        count = [0]  # tensors the outer autograd graph keeps for backward; checkpointed blocks keep only their inputs

        def pack(tensor):
            count[0] += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = unet(x, t, context)
        saved.append(count[0])
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}))
        unet.zero_grad(set_to_none=True)
    unet.grad_checkpoint = False
    unet.requires_grad_(False)
    (out, grads), (out_ckpt, grads_ckpt) = results
    assert torch.equal(out, out_ckpt)
    assert saved[1] < saved[0] / 2, saved
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(unet.parameters()))
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-6, atol=1e-9), name


@pytest.mark.parametrize("matmul_grad", [False, True])
def test_unet_gradients_match_diffusers(sd, monkeypatch, matmul_grad):
    """The training step's numbers: every weight's gradient equals diffusers', with nn.Conv2d's weight gradient and with
    model.Conv2d's matmul one (used on CPU for SD's wide, small maps; forced here on the tiny model's 32/64 channels)."""
    from nanoddpo.cpu_layers import Conv2d

    diffusers = pytest.importorskip("diffusers")
    monkeypatch.setattr(Conv2d, "matmul_grad_min_channels", 0 if matmul_grad else 10**9)
    monkeypatch.setattr(Conv2d, "matmul_all_min_channels", 32 if matmul_grad else 10**9)  # both paths, 32 / 64 wide
    monkeypatch.setattr(Conv2d, "matmul_all_max_pixels", 144)  # on 8 x 8 maps too
    ref = diffusers.UNet2DConditionModel(**TINY_UNET)
    ref.load_state_dict(sd.unet.state_dict())
    torch.manual_seed(0)
    x, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([981, 1])
    unet = sd.unet.requires_grad_(True)
    try:
        unet(x, t, context).pow(2).mean().backward()
        ref(x, t, context).sample.pow(2).mean().backward()
        ref_grads = dict(ref.named_parameters())
        for name, p in unet.named_parameters():
            assert rel_err(p.grad, ref_grads[name].grad) < 1e-5, name
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)


@pytest.mark.parametrize("all_matmul", [False, True])
@pytest.mark.parametrize("stride, size", [(1, (12, 12)), (2, (12, 12)), (2, (11, 7)), (1, (13, 13))])
def test_conv2d_matmul_weight_gradient(stride, size, all_matmul):
    """Conv2d's im2col path (SD's wide, small maps on a CPU): the weight gradient as a matmul, and with all_matmul the
    forward and the input gradient too, all equal to F.conv2d's, strided and on odd, non-square sizes included."""
    from nanoddpo.cpu_layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(8, 16, 3, stride=stride, padding=1)
    conv.matmul_grad_min_channels = 0  # this conv's 8 channels would take nn.Conv2d's path
    conv.matmul_all_min_channels, conv.matmul_all_max_pixels = (8, 144) if all_matmul else (10**9, 0)
    x = torch.randn(2, 8, *size, requires_grad=True)  # 11 x 7: the output's height and width must not swap
    assert ("_ConvIm2col" in type(conv(x).grad_fn).__name__) == (size[0] * size[1] <= 144)  # 13 x 13: nn.Conv2d
    outs, grads = [], []
    for forward in (conv, lambda x: F.conv2d(x, conv.weight, conv.bias, stride, 1)):
        out = forward(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (x, conv.weight, conv.bias)])
        x.grad = conv.weight.grad = conv.bias.grad = None
    assert outs[0].shape == outs[1].shape and rel_err(*outs) < 1e-6
    for ours, ref in zip(*grads):
        assert rel_err(ours, ref) < 1e-6


@pytest.mark.parametrize("trained", ["weight and bias", "bias", "nothing"])
def test_wide_linear_layers_on_onednn_matmuls_give_torchs_gradients(trained):
    """SD's wide Linear layers on a CPU run each matmul on oneDNN (cpu_layers.py) where no kept weight serves: a weight or a
    bias that trains, or more than 256 tokens. The output and every gradient asked for must be torch's, and the input
    is saved for the backward only when the weight trains (LoRA's frozen base would otherwise hold it twice)."""
    from nanoddpo import cpu_layers as model

    if not model._onednn:
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    layer = model.Linear(320, 48)
    layer.weight.requires_grad_(trained == "weight and bias")
    layer.bias.requires_grad_(trained != "nothing")
    x = torch.randn(2, 150, 320, requires_grad=True)  # 300 tokens: past what the kept weights serve
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert "_Matmul" in type(out.grad_fn).__name__ and (x.shape in saved) == (trained == "weight and bias")
    ref = F.linear(x, layer.weight, layer.bias)
    assert rel_err(out, ref) < 1e-6
    wanted, grad = [t for t in (x, layer.weight, layer.bias) if t.requires_grad], torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, wanted, grad), torch.autograd.grad(ref, wanted, grad)):
        assert ours.shape == theirs.shape and rel_err(ours, theirs) < 1e-6


def test_frozen_wide_layers_keep_onednn_weights_and_see_every_change():
    """SD's wide frozen layers on a CPU run from a kept blocked copy of the weight (cpu_layers.py). It must give torch's
    numbers (to float rounding: a 4,608-term sum), be remade after any change to the weight (an optimizer step,
    load_state_dict, a new tensor), give the input's gradient, and step aside (freeing the copy) when the weight
    trains, under torch_layers(), on large maps and for every layer of the tiny model."""
    from nanoddpo import cpu_layers as model

    if not model._onednn:
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    as_matmul = model.Conv2d(512, 16, 3, stride=2, padding=1)
    as_matmul.matmul_all_min_channels = 512  # its input gradient as a matmul, folded (SD's 1280 channels at 2 x 2)
    cases = [(model.Linear(320, 24), torch.randn(2, 5, 320), lambda l, x: F.linear(x, l.weight, l.bias)),
             (model.Conv2d(512, 16, 3, stride=2, padding=1), torch.randn(2, 512, 5, 5),
              lambda l, x: F.conv2d(x, l.weight, l.bias, 2, 1)),
             (as_matmul, torch.randn(2, 512, 5, 5), lambda l, x: F.conv2d(x, l.weight, l.bias, 2, 1))]
    for layer, x, torch_layer in cases:
        layer.requires_grad_(False)
        with torch.no_grad():
            assert rel_err(layer(x), torch_layer(layer, x)) < 1e-5 and layer in model._kept
            layer.weight.mul_(-2)  # in place, as an optimizer step
            assert rel_err(layer(x), torch_layer(layer, x)) < 1e-5
            layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
            assert rel_err(layer(x), torch_layer(layer, x)) < 1e-5
            layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight), requires_grad=False)
            assert rel_err(layer(x), torch_layer(layer, x)) < 1e-5
            with model.torch_layers():
                assert torch.equal(layer(x), torch_layer(layer, x))
        x.requires_grad_(True)
        grads = [torch.autograd.grad(f(x).pow(2).sum(), x)[0] for f in (layer, lambda x: torch_layer(layer, x))]
        assert layer in model._kept and rel_err(*grads) < 1e-5
        layer.bias.requires_grad_(True)  # a trained bias on a frozen weight gets its gradient (the kept path has none)
        grads = [torch.autograd.grad(f(x).pow(2).sum(), layer.bias)[0] for f in (layer, lambda x: torch_layer(layer, x))]
        assert rel_err(*grads) < 1e-5
        layer.requires_grad_(True)  # a trained weight: no kept copy (stale after a step), and the old one is freed
        out = layer(x)
        assert layer not in model._kept
        assert rel_err(out, torch_layer(layer, x)) < 1e-5

    large_maps = model.Conv2d(512, 16, 3, padding=1).requires_grad_(False)  # 289 positions: torch's path
    x = torch.randn(1, 512, 17, 17)
    with torch.no_grad():
        assert torch.equal(large_maps(x), F.conv2d(x, large_maps.weight, large_maps.bias, 1, 1))
    assert large_maps not in model._kept
    pointwise = model.Conv2d(512, 16, 1).requires_grad_(False)  # 1x1: torch's path, as oneDNN ran it 15x faster
    x = torch.randn(2, 512, 8, 8)
    with torch.no_grad():
        assert torch.equal(pointwise(x), F.conv2d(x, pointwise.weight, pointwise.bias))
    assert pointwise not in model._kept

    tiny = StableDiffusion.from_pretrained(Path(__file__).resolve().parents[1] / "weights" / "tiny")
    for m in tiny.modules():  # the tiny model's runs stay bit for bit what they were: none of its layers is wide enough
        if isinstance(m, (model.Linear, model.Conv2d)):
            assert (m.in_features if type(m) is model.Linear else m.in_channels) < m.blocked_min_features
