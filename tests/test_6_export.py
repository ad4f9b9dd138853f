"""Exporting trained weights (nanoddpo/export.py), with diffusers (and peft, which its LoRA loading uses) as the oracle:
the exported files, opened by diffusers, give the same UNet output as nanoddpo's trained model (fp32, relative error
below 1e-5). Runs are made by nanoddpo.checkpoint.save_checkpoint on the tiny model, as train.py writes them.
Run: pytest tests/test_6_export.py
"""
import pytest
import torch
from safetensors import safe_open

from nanoddpo.checkpoint import save_checkpoint
from nanoddpo.export import export, main
from nanoddpo.lora import add_lora, lora_parameters
from nanoddpo.model import LoadError, StableDiffusion

diffusers = pytest.importorskip("diffusers")


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def make_run(tiny_model_dir, run, lora, step=3):
    """A run folder with one checkpoint whose weights differ clearly from the base model."""
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    if lora:
        add_lora(sd.unet, rank=2)
    params = lora_parameters(sd.unet) if lora else list(sd.unet.parameters())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(params)
    save_checkpoint(run, sd, lora, optimizer, {"global_step": step, "epoch": 1, "settings": {"lora": lora}})
    return sd


def unet_inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 8, 8), torch.tensor([981, 21]), torch.randn(2, 77, 32)


def test_lora_export_loads_in_diffusers(tiny_model_dir, tmp_path):
    trained = make_run(tiny_model_dir, tmp_path / "runs" / "lora-run", lora=True)
    (path,) = export(tmp_path / "runs" / "lora-run", tmp_path / "out")
    assert path.name == "lora-run-step3-lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "2" and alpha.item() == 2.0
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert len(keys) == 3 * 4 * 2 * 4  # (down, up, alpha) x (q, k, v, out) x (attn1, attn2) x 4 transformers

    base = StableDiffusion.from_pretrained(tiny_model_dir)
    from nanoddpo.export import write_diffusers_folder
    from nanoddpo.single_file import SD_V1
    write_diffusers_folder(base, tmp_path / "base", SD_V1 / "scheduler_config.json")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    x, t, context = unet_inputs()
    with torch.no_grad():
        ours, theirs, before = trained.unet(x, t, context), pipe.unet(x, t, context).sample, base.unet(x, t, context)
    assert rel_err(theirs, ours) < 1e-5
    assert rel_err(before, ours) > 1e-2  # the LoRA changes the output: the agreement is not base == base


def test_full_export_opens_in_diffusers_and_as_single_file(tiny_model_dir, tmp_path):
    trained = make_run(tiny_model_dir, tmp_path / "runs" / "full-run", lora=False, step=5)
    main([str(tmp_path / "runs" / "full-run"), "--step", "5", "--out", str(tmp_path / "out"), "--single-file"])
    folder, single = tmp_path / "out" / "full-run-step5", tmp_path / "out" / "full-run-step5.safetensors"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    x, t, context = unet_inputs()
    with torch.no_grad():
        assert rel_err(pipe.unet(x, t, context).sample, trained.unet(x, t, context)) < 1e-5
        base = StableDiffusion.from_pretrained(tiny_model_dir)
        assert rel_err(base.unet(x, t, context), trained.unet(x, t, context)) > 1e-2
    # the VAE and text encoder are the base model's, unchanged; the folder and the file both load in nanoddpo
    for exported in (StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(single, config=folder)):
        for a, b in zip(exported.state_dict().values(), trained.state_dict().values()):
            assert torch.equal(a, b)
    assert pipe.tokenizer("a red cat").input_ids == trained.tokenizer("a red cat").input_ids


def test_export_errors(tiny_model_dir, tmp_path):
    with pytest.raises(LoadError, match="holds no checkpoints"):
        export(tmp_path / "runs" / "empty", tmp_path / "out")
    make_run(tiny_model_dir, tmp_path / "runs" / "r", lora=True)
    with pytest.raises(SystemExit, match="no checkpoint at step 7; it has: step_3"):
        main([str(tmp_path / "runs" / "r"), "--step", "7", "--out", str(tmp_path / "out")])
    # one line and exit code 1 (a str code), for argparse's errors too, and --out checked before anything loads
    (tmp_path / "file").write_text("")
    for args, message in [(["--step", "x", "--out", "o"], "--step: x: expected a whole number"),
                          ([], "the following arguments are required: --out"),
                          (["--out", tmp_path / "file"], f"--out {tmp_path / 'file'}: is a file: give a folder")]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "runs" / "r"), *map(str, args)])
        assert exit_info.value.code == f"nanoddpo.export: error: {message}"
    (tmp_path / "runs" / "r" / "checkpoints" / "step_3" / "state.json").unlink()  # a checkpoint damaged by hand
    with pytest.raises(SystemExit, match=r"nanoddpo.export: error: checkpoint .*step_3 cannot be read \(FileNotFound"):
        main([str(tmp_path / "runs" / "r"), "--out", str(tmp_path / "out")])


def test_export_takes_the_latest_checkpoint_unless_a_step_is_given(tiny_model_dir, tmp_path):
    """Without --step the run's latest checkpoint (the highest step) is exported, as the module's usage line says."""
    run = tmp_path / "runs" / "two"
    for step in (3, 10):
        make_run(tiny_model_dir, run, lora=True, step=step)
    assert export(run, tmp_path / "out")[0].name == "two-step10-lora.safetensors"
    assert export(run, tmp_path / "out", step=3)[0].name == "two-step3-lora.safetensors"


def test_a_base_model_that_moved_is_needed_only_by_a_full_export(tiny_model_dir, tmp_path):
    import shutil

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    make_run(base, tmp_path / "runs" / "full", lora=False)
    make_run(base, tmp_path / "runs" / "lora", lora=True)
    shutil.rmtree(base)  # moved, or the runs were copied from another machine
    with pytest.raises(LoadError, match=r"step_3 was trained on .*base, which is not there: pass --model with where it is"):
        export(tmp_path / "runs" / "full", tmp_path / "out")
    assert export(tmp_path / "runs" / "full", tmp_path / "out", base=tiny_model_dir)[0].is_dir()
    assert export(tmp_path / "runs" / "lora", tmp_path / "out")[0].is_file()  # a LoRA file names its base, loads none


def test_full_export_keeps_the_base_models_scheduler(tiny_model_dir, tmp_path):
    """The exported folder samples with the noise schedule of the base model it was trained from, not SD v1's."""
    import json
    import shutil
    from nanoddpo.single_file import SD_V1

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    schedule = {**json.loads((SD_V1 / "scheduler_config.json").read_text()), "beta_end": 0.02, "beta_schedule": "linear"}
    (base / "scheduler").mkdir()
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule))
    make_run(base, tmp_path / "runs" / "full", lora=False)
    (folder,) = export(tmp_path / "runs" / "full", tmp_path / "out")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == schedule
