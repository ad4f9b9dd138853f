"""The speed bench (nanoddpo/bench.py) end to end on the tiny model: every figure recorded and consistent, a failing
variant reported while the bench goes on, the baseline skipped without diffusers, bad input in one line. Timings
themselves are never asserted here: they belong to the bench, not to tests."""
import json
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from nanoddpo import bench
from nanoddpo.cli import keep_freed_memory
from nanoddpo.lora import add_lora
from nanoddpo.model import UNet

FIELDS = {"what", "variant", "unit", "ours", "baseline", "ratio", "ours_peak_gb", "baseline_peak_gb", "mfu_ours",
          "mfu_baseline", "error"}


def run_bench(tiny_model_dir, tmp_path, *extra):
    path = bench.main(["--model", str(tiny_model_dir), "--device", "cpu", "--precisions", "fp32", "--repeats", "1",
                       "--trajectories", "2", "--num-steps", "3", "--latent", "8", "--out-dir", str(tmp_path), *extra])
    return json.loads(path.read_text())


PAGE_FAULTS_OF_A_FREED_BLOCK = """
import ctypes, resource, sys
from nanoddpo import cli
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def faults():  # 64 MB from the C heap, as torch gets a tensor's memory: made, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(2**26)
    ctypes.memset(block, 1, 2**26)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
if sys.argv[1] == "keep":
    cli.keep_freed_memory("cpu")
print(faults(), sum(faults() for _ in range(4)))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults(monkeypatch):
    """On a CPU, train.py, sample.py and the bench keep freed memory, so the next large tensor reuses the
    last one's pages. Under glibc's defaults a 64 MB block is mapped fresh and unmapped when freed, and every use
    faults in its 16,384 pages of 4 KB again: the cost that was half of a full fine-tuning call at SD size on a CPU
    (mmap refused alone is not enough: the heap's top is trimmed back instead). Each case runs in its own process:
    the setting is process-wide."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    root = Path(__file__).resolve().parents[1]
    faults = {mode: subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_FREED_BLOCK, mode], cwd=root, env=env,
                                   capture_output=True, text=True, check=True).stdout.split() for mode in ("bare", "keep")}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: faults come per 2 MB, not per 4 KB")
    (first, then), (first_kept, then_kept) = [map(int, faults[mode]) for mode in ("bare", "keep")]
    assert first > 16000 and then > 4 * 16000, faults  # every use of the block: 16,384 fresh pages
    assert first_kept > 16000 and then_kept < 1000, faults  # the first use only

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user's own allocator settings stand, and are named
    assert keep_freed_memory() == "MALLOC_ARENA_MAX=2"
    assert keep_freed_memory("cuda:0").endswith("(not a CPU run)")  # a GPU run's host heap is left as it is


def test_bench_records_every_figure_and_goes_on_past_a_failing_variant(tiny_model_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")

    def no_compiler(model, mode=None, **kwargs):  # as torch.compile fails where its compiler cannot run
        raise RuntimeError(f"cannot compile in mode {mode} here")

    monkeypatch.setattr(torch, "compile", no_compiler)
    record = run_bench(tiny_model_dir, tmp_path, "--compile-modes", "eager,default")
    assert record["device"] == "cpu" and record["torch"] == torch.__version__
    assert record["settings"]["latent"] == 8 and record["settings"]["compile_modes"] == ["eager", "default"]
    rows = record["rows"]
    assert all(set(row) == FIELDS for row in rows)

    # The failing compile mode fails in both phases, says why, and the rows after it are still measured.
    failed = [i for i, row in enumerate(rows) if row["error"]]
    assert [rows[i]["variant"] for i in failed] == ["fp32/default"] * 2
    assert all("cannot compile in mode default" in rows[i]["error"] for i in failed)
    assert any(row["what"].startswith("train LoRA") for row in rows[failed[0] + 1:])

    eager = {row["what"]: row for row in rows if row["variant"] == "fp32/eager"}
    expected = ["sample: guided eps, UNet batch 2", "train full: forward, UNet batch 2", "train full: fwd+bwd, UNet batch 2",
                "train full +grad ckpt: fwd+bwd, batch 2", "train LoRA r4: fwd+bwd, UNet batch 2",
                "epoch LoRA: sample 2 traj x 3 steps", "epoch LoRA:   of which VAE decode",
                "epoch LoRA: train 2 traj x 3 steps", "epoch LoRA: sample + train", "trajectories per hour (no reward)",
                "seconds per 1,000-image epoch"]
    assert list(eager) == expected
    for row in eager.values():  # ours and the baseline both measured, the ratio is theirs
        assert row["ours"] > 0 and row["baseline"] > 0 and row["error"] is None
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
    for what in expected[:5]:
        assert eager[what]["ours_peak_gb"] > 0.1 and eager[what]["baseline_peak_gb"] > 0.1  # the whole process's RSS

    # The epoch's derived figures follow from its phases; a backward costs more than the forward alone.
    total = eager["epoch LoRA: sample + train"]
    assert total["ours"] == pytest.approx(eager[expected[5]]["ours"] + eager[expected[7]]["ours"])
    assert eager[expected[6]]["ours"] < eager[expected[5]]["ours"]
    assert eager["trajectories per hour (no reward)"]["ours"] == pytest.approx(3600 * 2 / total["ours"])
    assert eager["seconds per 1,000-image epoch"]["baseline"] == pytest.approx(1000 * total["baseline"] / 2)
    assert eager[expected[2]]["ours"] > eager[expected[1]]["ours"]

    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: cannot compile in mode default" in out and str(tmp_path) in out
    assert "not 50, to keep the bench short" in out  # the miniature epoch says it ran fewer steps


def test_baseline_skipped_without_diffusers_and_out_of_memory_reported(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(bench, "sampling_call", out_of_memory)
    record = run_bench(tiny_model_dir, tmp_path, "--epoch", "none")
    out = capsys.readouterr().out
    assert "baseline: skipped: diffusers is not installed" in out
    rows = {row["what"]: row for row in record["rows"]}
    assert rows["sample: guided eps, UNet batch 2"]["error"] == "out of memory at 8 x 8 latents, UNet batch 2"
    assert rows["train LoRA r4: fwd+bwd, UNet batch 2"]["ours"] > 0  # measured after the failure
    assert all(row["baseline"] is None and row["ratio"] is None for row in record["rows"])


def test_parts_time_only_what_is_asked(tiny_model_dir, tmp_path):
    record = run_bench(tiny_model_dir, tmp_path, "--parts", "sample,lora", "--no-baseline")
    assert [row["what"] for row in record["rows"]] == ["sample: guided eps, UNet batch 2", "train LoRA r4: fwd+bwd, UNet batch 2"]


def test_profile_splits_our_calls_by_kind_of_work_in_channels_last(tiny_model_dir, tmp_path):
    a = bench.parse_args(["--model", str(tiny_model_dir), "--device", "cpu", "--precisions", "fp32", "--repeats", "1",
                          "--latent", "8", "--parts", "sample,lora", "--no-baseline", "--profile", "--channels-last"])
    rows, sd = bench.run(bench.fill_defaults(a, cuda=False), torch.device("cpu"), heap=None)
    convs = [m.weight for m in sd.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert [row["variant"] for row in rows] == ["fp32/eager/NHWC"] * 2
    for row in rows:  # the UNet's three kinds of heavy work are all found, largest first
        kinds = row["ms_by_kind"]
        assert {"conv", "matmul", "attention", "norm & pointwise"} <= set(kinds) and min(kinds.values()) > 0
        assert list(kinds.values()) == sorted(kinds.values(), reverse=True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_time_by_kind_adds_up_each_kind_in_milliseconds(monkeypatch, device):
    """The profiler's own times (microseconds, one row per operator or kernel), summed per kind of work, largest
    first: on a CPU the operators' own CPU time, on a GPU the kernels' device time (here 10x the CPU's)."""
    rows = [("aten::mkldnn_convolution", 3000), ("aten::addmm", 1500), ("aten::convolution_backward", 2500),
            ("aten::empty", 0), ("aten::native_group_norm", 250)]
    scale = 10 if device == "cuda" else 1
    activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    class Profile:  # torch.profiler.profile as time_by_kind uses it, with known times
        def __init__(self, activities):
            assert activities == [activity]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [types.SimpleNamespace(key=k, self_cpu_time_total=us if device == "cpu" else 1,
                                          self_device_time_total=10 * us if device == "cuda" else 0) for k, us in rows]

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    calls = []
    ms, _ = bench.time_by_kind(lambda: calls.append(1), torch.device(device))
    assert calls == [1]
    assert list(ms.items()) == [("conv", 5.5 * scale), ("matmul", 1.5 * scale), ("norm & pointwise", 0.25 * scale)]
    assert bench.kinds_line(ms) == {"cpu": "conv 5.5 ms (76%), matmul 1.5 ms (21%), norm & pointwise 0.2 ms (3%)",
                                    "cuda": "conv 55.0 ms (76%), matmul 15.0 ms (21%), norm & pointwise 2.5 ms (3%)"}[device]


@pytest.mark.parametrize("name, kind", [  # kernels from an H200's profile of the compiled LoRA training call (bf16)
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1", "attention"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float>", "NCHW<->NHWC copies"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x128x64", "conv"),
    ("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_128x256_32x3_nn_align2>", "matmul"),
    ("triton_poi_fused_cat_gelu_gelu_backward_mul_split_view_5", "norm & pointwise"),
    ("triton_poi_fused_convolution_0", "norm & pointwise"),  # a conv's bias add, fused by inductor
    ("triton_red_fused__to_copy_add_native_layer_norm_backward_view_12", "norm & pointwise"),
    # PyTorch's own FlashAttention-2 kernels (docs/profile_lora_call.py -flash), one with "conv" in its name
    ("void pytorch_flash::flash_bwd_convert_dq_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8, 2, 4, 2>>", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>", "attention"),
    ("void pytorch_flash::flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<64>>", "attention"),
    ("aten::mkldnn_convolution", "conv"), ("aten::addmm", "matmul"),  # CPU operators
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::empty_strided", "other"),
])
def test_profiled_names_by_kind_of_work(name, kind):
    assert bench.kind_of(name) == kind


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/folder"], "model folder /no/such/folder does not exist"),
    (["--precisions", "fp8"], "--precisions fp8: choose from fp32, bf16, fp16"),
    (["--parts", "sample,vae"], "--parts vae: choose from sample, full, lora, epoch"),
    (["--batch", "x"], "--batch: x: expected a whole number"),  # argparse's own errors too, exit code 1 not 2
])
def test_bad_input_is_one_clear_line(args, message):
    result = subprocess.run([sys.executable, "-m", "nanoddpo.bench", "--device", "cpu", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bench: error: {message}"), result.stderr


BAD_ARGS = [  # refused in one line before the bench builds anything (--latent once the model's levels are known)
    (["--device", "gpu"], "--device gpu: choose auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: no such GPU"),
    (["--latent", "-8"], "--latent -8: must be 0 (the device's default) or more"),
    (["--batch", "-1"], "--batch -1: must be 0 (the device's default) or more"),
    (["--train-batch", "-1"], "--train-batch -1: must be 0 (the device's default) or more"),
    (["--trajectories", "-2"], "--trajectories -2: must be 0 (the device's default) or more"),
    (["--num-steps", "1001"], "--num-steps 1001: must be at most 1000 (the schedule's training steps)"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
    (["--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
    (["--threads", "1025"], "--threads 1025: must be 0 (torch's default) to 1024"),
    (["--compile-modes", "eager,fast"], "--compile-modes eager,fast: choose from eager, default, reduce-overhead, "
                                        "max-autotune, max-autotune-no-cudagraphs"),
    (["--epoch", "some"], "--epoch: invalid choice: 'some'"),
    (["--latent", "5"], "--latent 5: must be a multiple of 2 for this UNet's 2 levels"),
]


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_settings_fail_in_one_line(tiny_model_dir, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_bench(tiny_model_dir, tmp_path, *args)
    assert str(exit_info.value).startswith(f"bench: error: {message}") and "\n" not in str(exit_info.value)


def test_a_bench_cut_short_keeps_the_rows_it_measured(tiny_model_dir, tmp_path, monkeypatch, capsys):
    add = bench.Table.add

    def ctrl_c_after_two_rows(table, *args, **kwargs):
        add(table, *args, **kwargs)
        if len(table.rows) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(bench.Table, "add", ctrl_c_after_two_rows)
    with pytest.raises(SystemExit) as exit_info:
        run_bench(tiny_model_dir, tmp_path, "--no-baseline")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 130 and err.startswith("bench: interrupted: the figures measured so far are in "), err
    record = json.loads(Path(err.split(" are in ")[1]).read_text())
    assert [row["what"] for row in record["rows"]] == ["sample: guided eps, UNet batch 2", "train full: forward, UNet batch 2"]
    assert record["rows"][0]["ours"] > 0 and record["device"] == "cpu" and record["settings"]["latent"] == 8


def test_out_dir_that_is_a_file_is_refused_before_the_bench(tiny_model_dir, tmp_path):
    (tmp_path / "bench").write_text("")
    with pytest.raises(SystemExit, match="--out-dir .*bench: is a file: give a folder"):
        bench.main(["--model", str(tiny_model_dir), "--device", "cpu", "--out-dir", str(tmp_path / "bench")])


def test_mfu_formula():
    """2 (the guidance pair) x samples x (forward FLOPs x sampling steps + train FLOPs x trained steps) over seconds and
    the card's dense bf16 peak: 2 x 10 x (1e12 x 50 + 2.13e12 x 25) / 100 s = 2.065e13 FLOP/s, / 989e12 = 0.0209."""
    assert bench.mfu(1e12, 2.13e12, 50, 10, 25, 100.0, device_name="NVIDIA H100 80GB HBM3") == 0.0209
    assert bench.mfu(1e12, 2.13e12, 50, 10, 25, 100.0, device_name="NVIDIA A100-SXM4-80GB") == round(2.065e13 / 312e12, 4)
    assert bench.mfu(1e12, 2.13e12, 50, 10, 25, 100.0, device_name="Some Card") is None


def test_training_flops_are_the_backward_that_runs():
    """SD v1-4 at 512 px, counted on meta tensors (shapes only, a few seconds): a forward is 0.803 TFLOP; full
    fine-tuning's forward + backward 3.0x that (input and weight gradients); LoRA's only 2.13x, since no frozen weight
    gets a gradient. Counting LoRA as 3 forwards overstated its MFU by 40%."""
    cfg = json.loads((Path(__file__).parents[1] / "nanoddpo/configs/sd-v1-4/unet_config.json").read_text())
    with torch.device("meta"):
        unet = UNet(cfg).requires_grad_(False)
    sd = types.SimpleNamespace(unet=unet, latent_shape=(4, 64, 64), max_length=77, device=torch.device("meta"),
                               dtype=torch.float32)
    forward = bench.image_flops(sd)
    assert forward == pytest.approx(0.8033e12, rel=1e-4)
    unet.requires_grad_(True)
    unet.grad_checkpoint = True  # model FLOPs: the recomputed forward is not counted
    assert bench.image_flops(sd, train=True) / forward == pytest.approx(2.996, abs=1e-3)
    assert unet.grad_checkpoint and all(p.grad is None for p in unet.parameters())
    unet.requires_grad_(False)
    add_lora(unet, 4)
    assert bench.image_flops(sd, train=True) / bench.image_flops(sd) == pytest.approx(2.131, abs=1e-3)
    unet.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable weights"):
        bench.image_flops(sd, train=True)


def test_flops_counted_for_half_precision_weights_with_fp32_lora(tiny_model_dir):
    """train.py's CUDA path: bf16 / fp16 weights with fp32 LoRA adapters. Counting without autocast crashed there at
    the end of the first epoch (seen on an H200); the count must not depend on the dtype."""
    from nanoddpo.lora import add_lora
    from nanoddpo.model import StableDiffusion

    counts = {}
    for dtype in (torch.float32, torch.bfloat16):
        sd = StableDiffusion.from_pretrained(tiny_model_dir, dtype=dtype)
        plain = bench.image_flops(sd)
        del sd.unet_flops
        torch.manual_seed(0)
        add_lora(sd.unet, 4)
        counts[dtype] = bench.image_flops(sd), bench.image_flops(sd, train=True)  # train.py's MFU counts both
        assert counts[dtype][0] > plain  # the adapters' matmuls are counted too
    assert counts[torch.float32] == counts[torch.bfloat16]
