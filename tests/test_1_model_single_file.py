"""Single-file SD 1.x checkpoints (nanoddpo/single_file.py): CLIP's shipped tokenizer, the layout mapping checked against
diffusers' from_single_file as an independent oracle, the variants real files come in, and the files refused.

The tiny models of conftest.py have a tiny vocabulary, so their single files are read with `config=` (the configs and
tokenizer of a model folder, as diffusers' from_single_file(config=...) does); the default path, SD v1's shipped configs
and CLIP's tokenizer, is tested on its own (the tokenizer, and a tiny file refused for not matching SD v1's shapes).
Run: pytest tests/test_1_model_single_file.py
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoddpo.model import LoadError, StableDiffusion, load_tokenizer, resolve_model
from nanoddpo.single_file import (IGNORED, clip_tokenizer_folder, ema_key, refuse_unsupported, save_single_file,
                                  unet_table)


@pytest.fixture(scope="module")
def sd(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_file(sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_single_file(sd, path)
    return path


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- CLIP's tokenizer, built from the shipped merge list -----------------------------------------------------------

def test_clip_tokenizer_from_shipped_merges(tmp_path):
    tok = load_tokenizer(clip_tokenizer_folder(cache=tmp_path))
    vocab = tok.get_vocab()
    assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["jekyll</w>"] == 49405
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's known encoding
    # upper case and punctuation: lower-cased, split off, every piece a known token
    ids = tok("A Photo of a CAT, 4k!").input_ids
    assert ids[:6] == [49406, 320, 1125, 539, 320, 2368] and ids[-1] == 49407 and max(ids[1:-1]) < 49406
    assert clip_tokenizer_folder(cache=tmp_path) == clip_tokenizer_folder(cache=tmp_path)  # built once, then reused


# --- the mapping, with diffusers as the oracle ---------------------------------------------------------------------

def test_mapping_names_what_sd_v1_files_hold():
    import json
    from nanoddpo.single_file import SD_V1
    t = unet_table(json.loads((SD_V1 / "unet_config.json").read_text()))
    assert t["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert t["down_blocks.2.downsamplers.0.conv"] == "input_blocks.9.0.op"
    assert t["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"  # no attention in the first up block
    assert t["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert t["up_blocks.3.resnets.2.time_emb_proj"] == "output_blocks.11.0.emb_layers.1"
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_mapping_matches_diffusers_conversion_at_sd_v1_size():
    """Every tensor name of a full-size SD v1 file, through diffusers' own converters, lands on the same parameter as
    through ours. Each tensor is one number, its index, so this costs no memory; the VAE's attention is 4-d as stored."""
    pytest.importorskip("diffusers")
    import json
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from nanoddpo.model import VAE, UNet, build
    from nanoddpo.single_file import SD_V1, original_names

    cfgs = [json.loads((SD_V1 / f"{name}_config.json").read_text()) for name in ("unet", "vae")]
    unet, vae = build(UNet, dict(cfgs[0]), "unet"), build(VAE, dict(cfgs[1]), "vae")
    for names, convert, cfg in zip(original_names(unet, vae), (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint), cfgs):
        ours = list(names)
        checkpoint = {names[k]: torch.full((1, 1, 1, 1) if ".attn_1." in names[k] else (1,), float(i))
                      for i, k in enumerate(ours)}
        converted = convert(checkpoint, cfg)
        assert converted.keys() == set(ours)
        assert all(converted[k].flatten().item() == i for i, k in enumerate(ours))
    assert len(names) == 248  # the VAE's tensors in SD v1-4 (tests/reference/sd-v1-4/vae_keys.tsv)


def test_single_file_matches_diffusers_from_single_file(sd, tiny_model_dir, tiny_file, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from nanoddpo.export import write_diffusers_folder
    from nanoddpo.single_file import SD_V1

    keys = load_file(tiny_file).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys and "model.diffusion_model.out.2.weight" in keys
    # diffusers reads the file with a local config folder (offline): the same tensors as nanoddpo's folder
    write_diffusers_folder(sd, tmp_path / "config", SD_V1 / "scheduler_config.json")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(tiny_file), config=str(tmp_path / "config"),
                                                              local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        ours = getattr(sd, name).state_dict()
        theirs = getattr(pipe, name).state_dict()
        if name == "text_encoder":  # transformers 5 keeps CLIPTextModel's keys without "text_model."
            theirs = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in theirs.items()}
        assert theirs.keys() == ours.keys(), name
        assert all(torch.equal(theirs[k], ours[k]) for k in ours), name
    # and nanoddpo's model from the file is the model from the folder
    assert_same(StableDiffusion.from_pretrained(tiny_file, config=tiny_model_dir), sd)


def test_vae_attention_is_written_as_the_original_1x1_convs(sd, tiny_file):
    """latent-diffusion's VAE attention (AttnBlock) holds q, k, v and proj_out as 1x1 Conv2d layers: an original-layout
    file stores their weights as [C, C, 1, 1], which the SD UIs load into those convs."""
    tensors = load_file(tiny_file)
    channels = sd.vae.cfg["block_out_channels"][-1]
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            key = f"first_stage_model.{part}.mid.attn_1.{name}"
            assert tensors[key + ".weight"].shape == (channels, channels, 1, 1) and tensors[key + ".bias"].shape == (channels,)


# --- the variants real files come in --------------------------------------------------------------------------------

SCHEDULE = {"betas": torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64), "alphas_cumprod": torch.rand(1000),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32)}


def test_file_with_ema_loads_ema_weights_by_default(sd, tiny_model_dir, tiny_file, tmp_path):
    tensors = load_file(tiny_file)
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    # the EMA copy holds the model; model.diffusion_model.* holds other (the "trained") weights
    both = {**tensors, **{ema_key(k): tensors[k] for k in unet_keys}, **{k: tensors[k] + 1 for k in unet_keys}, **SCHEDULE}
    save_file(both, tmp_path / "full-ema.safetensors")
    assert_same(StableDiffusion.from_pretrained(tmp_path / "full-ema.safetensors", config=tiny_model_dir), sd)
    trained = StableDiffusion.from_pretrained(tmp_path / "full-ema.safetensors", config=tiny_model_dir, ema=False)
    assert torch.equal(trained.unet.conv_in.weight, sd.unet.conv_in.weight + 1)
    assert torch.equal(trained.vae.decoder.conv_in.weight, sd.vae.decoder.conv_in.weight)
    # an incomplete EMA copy is a missing tensor, not a silent fallback to the other weights
    del both[ema_key(unet_keys[0])]
    save_file(both, tmp_path / "cut-ema.safetensors")
    with pytest.raises(LoadError, match="1 tensors missing from the file"):
        StableDiffusion.from_pretrained(tmp_path / "cut-ema.safetensors", config=tiny_model_dir)


def test_fp16_file_with_position_ids_and_old_text_names(sd, tiny_model_dir, tiny_file, tmp_path):
    tensors = {k: v.half() for k, v in load_file(tiny_file).items()}
    old_text = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                for k, v in tensors.items()}
    for name, variant in (("new", tensors), ("old", old_text)):
        prefix = "cond_stage_model.transformer." + ("text_model." if name == "new" else "")
        variant[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
        save_file({**variant, **SCHEDULE}, tmp_path / f"{name}.safetensors")
        for dtype in (torch.float16, torch.float32):
            half = StableDiffusion.from_pretrained(tmp_path / f"{name}.safetensors", config=tiny_model_dir, dtype=dtype)
            assert all(p.dtype == dtype for p in half.parameters())
            for a, b in zip(half.state_dict().values(), sd.state_dict().values()):
                assert torch.equal(a, b.half().to(dtype))


def test_unknown_or_missing_tensor_is_named(tiny_model_dir, tiny_file, tmp_path):
    tensors = load_file(tiny_file)
    save_file({**tensors, "model.diffusion_model.mystery.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(LoadError, match=r"\(unet\): 1 tensors the model does not have \(first: model.diffusion_model.mystery"):
        StableDiffusion.from_pretrained(tmp_path / "extra.safetensors", config=tiny_model_dir)
    save_file({**tensors, "something_else": torch.zeros(2)}, tmp_path / "stray.safetensors")
    with pytest.raises(LoadError, match="something_else"):
        StableDiffusion.from_pretrained(tmp_path / "stray.safetensors", config=tiny_model_dir)
    del tensors["first_stage_model.decoder.up.0.block.0.conv1.weight"]
    save_file(tensors, tmp_path / "short.safetensors")
    with pytest.raises(LoadError, match=r"\(vae\): 1 tensors missing from the file \(first: decoder.up_blocks.1.resnets.0"):
        StableDiffusion.from_pretrained(tmp_path / "short.safetensors", config=tiny_model_dir)
    assert "betas" in IGNORED and "alphas_cumprod" in IGNORED


def test_default_configs_are_sd_v1(tiny_file, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the tokenizer folder is built here, not in ~/.cache
    with pytest.raises(LoadError, match=r"SD v1's configs.*shapes that do not match"):
        StableDiffusion.from_pretrained(tiny_file)
    assert (tmp_path / "nanoddpo" / "clip-tokenizer" / "vocab.json").is_file()


# --- refused: pickles, later SD versions ----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickles_are_refused_with_the_conversion(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, path)
    for load in (resolve_model, StableDiffusion.from_pretrained):
        with pytest.raises(LoadError, match=r"(?s)pickle: loading one runs whatever code.*save_file") as err:
            load(str(path))
        assert f"{tmp_path / 'model'}.safetensors" in str(err.value)


def test_resolve_model_takes_a_file_or_a_dotted_folder(tiny_file, tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_file)) == tiny_file
    with pytest.raises(LoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.safetensors"))
    dotted = tmp_path / "stable-diffusion-v1.5"
    dotted.symlink_to(tiny_model_dir)
    assert resolve_model(str(dotted)) == dotted
    with pytest.raises(LoadError, match=r"config.json is a file: give the model folder \(or one .safetensors"):
        resolve_model(str(tiny_model_dir / "unet" / "config.json"))  # a file of the folder, not the folder
    with pytest.raises(LoadError, match=r"has no unet/ folder: a Stable Diffusion folder holds unet/, vae/"):
        resolve_model(str(tiny_model_dir.parent))  # the folder above it: said before a run starts, not at loading
    with pytest.raises(LoadError, match="is a folder: give a single .safetensors file here"):
        refuse_unsupported(str(tiny_model_dir))


@pytest.mark.parametrize("prefix, version", [("cond_stage_model.model.transformer.resblocks.0.ln_1.weight", "SD 2.x"),
                                             ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "SDXL")])
def test_later_sd_versions_are_refused(tiny_model_dir, tiny_file, tmp_path, prefix, version):
    save_file({**load_file(tiny_file), prefix: torch.zeros(2)}, tmp_path / "later.safetensors")
    with pytest.raises(LoadError, match=f"is an {version}.*nanoddpo builds SD v1.x only"):
        StableDiffusion.from_pretrained(tmp_path / "later.safetensors", config=tiny_model_dir)


@pytest.mark.parametrize("change", [{"use_linear_projection": True, "attention_head_dim": [5, 10, 20, 20]},  # SD 2.x
                                    {"addition_embed_type": "text_time", "transformer_layers_per_block": [1, 2, 10]}])  # SDXL
def test_later_sd_version_folders_are_refused(tiny_model_dir, tmp_path, change):
    import json
    import shutil
    root = shutil.copytree(tiny_model_dir, tmp_path / "later")
    cfg = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(LoadError, match="features of a later SD version.*nanoddpo builds SD v1.x UNets"):
        StableDiffusion.from_pretrained(root)


def test_inspecting_a_file_counts_each_networks_tensors(tiny_file, capsys):
    from nanoddpo.cli import UsageError
    from nanoddpo.single_file import main

    main([str(tiny_file)])  # python -m nanoddpo.single_file FILE
    keys = load_file(tiny_file).keys()
    count = lambda prefix: sum(k.startswith(prefix) for k in keys)
    assert capsys.readouterr().out.splitlines() == [
        f"unet: {count('model.diffusion_model.')} tensors", f"vae: {count('first_stage_model.')} tensors",
        f"text_encoder: {count('cond_stage_model.')} tensors", "one UNet copy: model.diffusion_model.*"]
    with pytest.raises(UsageError, match="the following arguments are required: file"):
        main([])
