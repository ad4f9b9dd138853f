"""nanoddpo/model.py at the real SD v1-4 size: the published file layout, peak memory while loading, parity in float32.

No weights can be downloaded here, so the test writes a random-weight SD v1-4 folder with exactly the published tensor
names and shapes (checked against tests/reference/sd-v1-4/*_keys.tsv), then loads it in a fresh process to measure
its peak resident memory, and checks each network against diffusers / transformers at full size.
It needs ~5 GB of disk (~7 GB with the fp16 copy), ~6 GB of RAM and several minutes on CPU, so it is opt-in:

    NANODDPO_FULL_SIZE=1 python -m pytest -s -q tests/test_1_model_full_size.py
    NANODDPO_FULL_SIZE_DIR=/tmp/sd-v1-4-random ...   # keep the written folder and reuse it on the next run
"""
import ast
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoddpo.world import bytes_to_unicode
from nanoddpo.model import COMPONENTS, DROPPED, StableDiffusion, load_tokenizer, read_safetensors_header

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("NANODDPO_FULL_SIZE") != "1", reason="full size: set NANODDPO_FULL_SIZE=1"),
]

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("NANODDPO_REFERENCE_DIR", REPO / "tests" / "reference" / "sd-v1-4"))  # key lists
CONFIGS = REPO / "nanoddpo" / "configs" / "sd-v1-4"  # the published config.json of each component, shipped
VOCAB_SIZE = 49408  # CLIP's: 256 bytes, 256 bytes + "</w>", 48894 merges, <|startoftext|> and <|endoftext|>
GB = 1e9


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def reference_config(name):
    return json.loads((CONFIGS / f"{name}_config.json").read_text())


def reference_keys(name):
    """{key: shape} from a *_keys.tsv: a header line, then key, shape and (VAE) the legacy name, tab-separated."""
    rows = [line.split("\t") for line in (REFERENCE / f"{name}_keys.tsv").read_text().splitlines()[1:] if line]
    return {row[0]: tuple(ast.literal_eval(row[1])) for row in rows}


def memory():
    """This process's resident memory from /proc/self/status, in bytes: now (VmRSS), peak (VmHWM), and RSS split
    into anonymous memory (tensors) and file pages (mapped files: shared libraries, mmapped weights)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def write_tokenizer(folder):
    """A CLIP-format BPE tokenizer with SD v1-4's vocabulary size: the byte alphabet, a few merges, then dummy
    tokens up to id 49405, so <|startoftext|> and <|endoftext|> get CLIP's ids 49406 and 49407."""
    merges = ["r e", "re d</w>", "c a", "ca t</w>"]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += [f"<|dummy{i}|>" for i in range(VOCAB_SIZE - 2 - len(vocab))] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def weight_files(root):
    return {name: root / name / f"{stem}.safetensors" for name, stem, _, _ in COMPONENTS}


def write_folder(root):
    """Random init at full size, then save_pretrained: one copy of the model in memory (safetensors writes from the
    tensors' own memory). The reference config.json files go in last, over the ones save_pretrained wrote."""
    root = Path(root)
    start = memory()["VmRSS"]
    write_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    sd = StableDiffusion(*(reference_config(name) for name, *_ in COMPONENTS), load_tokenizer(root / "tokenizer"))
    model_bytes = sum(p.numel() * p.element_size() for p in sd.parameters())
    sd.save_pretrained(root)
    for name, *_ in COMPONENTS:
        shutil.copyfile(CONFIGS / f"{name}_config.json", root / name / "config.json")
    return dict(model_bytes=model_bytes, start=start, **memory())


def write_fp16_copy(root, dst):
    """The published fp16 variant (name.fp16.safetensors), converted one tensor at a time from the float32 folder."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(root / "tokenizer", dst / "tokenizer")
    for name, path in weight_files(root).items():
        (dst / name).mkdir(parents=True)
        shutil.copyfile(root / name / "config.json", dst / name / "config.json")
        with safe_open(path, "pt") as f:
            half = {key: f.get_tensor(key).half() for key in f.keys()}
        save_file(half, dst / name / path.name.replace(".safetensors", ".fp16.safetensors"))
        del half


# What the measured subprocess runs: import, note the baseline, load, report. Nothing else touches its memory.
LOAD_SCRIPT = """
import json, sys, time
from pathlib import Path
def memory():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
import torch
after_torch = memory()["VmRSS"]
from nanoddpo.model import StableDiffusion
before_load = memory()["VmRSS"]
start = time.perf_counter()
sd = StableDiffusion.from_pretrained(sys.argv[1], dtype=torch.float32)
seconds = time.perf_counter() - start
model_bytes = sum(p.numel() * p.element_size() for p in sd.parameters())
print(json.dumps(dict(after_torch=after_torch, before_load=before_load, seconds=seconds, model_bytes=model_bytes,
                      **memory())))
"""


def run_python(*args):
    """Run in a fresh interpreter with the repository importable; its last stdout line is a JSON report."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not REFERENCE.is_dir():
        pytest.fail(f"no reference configs at {REFERENCE}: set NANODDPO_REFERENCE_DIR")
    given = os.environ.get("NANODDPO_FULL_SIZE_DIR")
    root = Path(given) if given else tmp_path_factory.mktemp("full_size") / "sd-v1-4"
    expected = [*weight_files(root).values(), *(root / name / "config.json" for name, *_ in COMPONENTS),
                root / "tokenizer" / "vocab.json", root / "tokenizer" / "merges.txt"]
    if all(p.is_file() for p in expected):
        print(f"\nreusing {root}")
    else:
        start = time.perf_counter()
        report = run_python(__file__, "write", str(root))
        print(f"\nwrote {root} in {time.perf_counter() - start:.0f} s: model {report['model_bytes'] / GB:.3f} GB, "
              f"peak RSS {report['VmHWM'] / GB:.3f} GB ({report['VmHWM'] / report['model_bytes']:.3f}x the model)")
        # Random init plus save_pretrained should hold the model once, plus the interpreter and libraries.
        assert report["VmHWM"] <= 1.3 * report["model_bytes"]
    yield root
    if not given:
        shutil.rmtree(root)


def test_published_layout(folder):
    for (name, *_), path in zip(COMPONENTS, weight_files(folder).values()):
        entries = read_safetensors_header(path)
        written = {key: shape for key, (_, shape, _) in entries.items()}
        # The published files hold exactly these tensors; the old int64 position_ids buffer the loader drops is
        # listed in the reference too (older files have it) but is not a tensor of the model.
        expected = {k: s for k, s in reference_keys(name).items() if k not in DROPPED}
        assert written == expected, f"{name}: {sorted(set(written) ^ set(expected))[:5]}"
        assert {dtype for dtype, _, _ in entries.values()} == {"F32"}
        assert json.loads((folder / name / "config.json").read_text()) == reference_config(name)
        print(f"\n{name}: the {len(written)} tensors match the reference names and shapes")
    assert len(load_tokenizer(folder / "tokenizer")) == VOCAB_SIZE


def measure_load(root, label):
    report = run_python("-c", LOAD_SCRIPT, str(root))
    size, peak, base = report["model_bytes"], report["VmHWM"], report["before_load"]
    print(f"\n{label}: loaded in {report['seconds']:.1f} s. model {size / GB:.3f} GB ({size} bytes); "
          f"RSS after import torch {report['after_torch'] / GB:.3f} GB, before load {base / GB:.3f} GB; "
          f"peak {peak / GB:.3f} GB = {peak / size:.3f}x the model, (peak - baseline) = {(peak - base) / size:.3f}x; "
          f"at the end RSS {report['VmRSS'] / GB:.3f} GB (anonymous {report['RssAnon'] / GB:.3f}, "
          f"file pages {report['RssFile'] / GB:.3f})")
    return report


def test_load_peak_memory(folder):
    report = measure_load(folder, "float32 files -> float32")
    assert report["VmHWM"] <= 1.3 * report["model_bytes"]


def test_load_peak_memory_from_fp16_variant(folder, tmp_path):
    try:
        write_fp16_copy(folder, tmp_path / "fp16")
        report = measure_load(tmp_path / "fp16", "fp16 variant files -> float32")
    finally:
        shutil.rmtree(tmp_path / "fp16", ignore_errors=True)  # 2 GB
    assert report["VmHWM"] <= 1.3 * report["model_bytes"]


# --- parity at full size, float32: one reference network in memory at a time -----------------------------------------

@pytest.fixture(scope="module")
def sd(folder):
    return StableDiffusion.from_pretrained(folder, dtype=torch.float32)


def sharing_reference(build, state):
    """Build a diffusers model on the meta device and point it at our tensors (assign=True): the same weights
    without a second copy of the 3.4 GB UNet. Forward passes only read the weights, so sharing them is safe."""
    with torch.device("meta"):
        ref = build()
    ref.load_state_dict(state, assign=True)
    assert not any(t.is_meta for t in [*ref.parameters(), *ref.buffers()])
    return ref.eval()


def check(name, ours, ref, seconds):
    err = rel_err(ours, ref)
    print(f"\n{name}: relative error {err:.2e}, output {tuple(ours.shape)} std {ours.std().item():.3g}, "
          f"{seconds:.0f} s for both")
    # Finite and far from constant, so the relative error measures real agreement.
    assert torch.isfinite(ours).all() and ours.std() > 1e-3
    assert err < 1e-5


def test_unet_matches_diffusers(sd):
    from diffusers import UNet2DConditionModel

    ref = sharing_reference(lambda: UNet2DConditionModel.from_config(reference_config("unet")), sd.unet.state_dict())
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 4, 64, 64), torch.tensor([981]), torch.randn(1, 77, 768)
    start = time.perf_counter()
    with torch.no_grad():
        ours, theirs = sd.unet(x, t, context), ref(x, t, context).sample
    check("UNet (1, 4, 64, 64), t = 981", ours, theirs, time.perf_counter() - start)
    del ref, theirs
    gc.collect()


def test_unet_gradients_match_diffusers(sd):
    """The training step at full width, where the CPU fast paths of nanoddpo/cpu_layers.py run (oneDNN matmuls, kept
    weights, im2col convs at 2 x 2 and 4 x 4): with the weights frozen (LoRA's base), the gradients of the latents and
    of the text context; then every weight's gradient, with all of them trained. 16 x 16 latents, batch 2."""
    from diffusers import UNet2DConditionModel

    ref = sharing_reference(lambda: UNet2DConditionModel.from_config(reference_config("unet")), sd.unet.state_dict())
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([981, 21]), torch.randn(2, 77, 768)
    weights = torch.randn(2, 4, 16, 16)  # a loss that weighs every output differently
    grads = []
    for unet in (sd.unet, lambda *a: ref(*a).sample):
        inputs = [x.clone().requires_grad_(), context.clone().requires_grad_()]
        grads.append(torch.autograd.grad((unet(inputs[0], t, inputs[1]) * weights).sum(), inputs))
    for name, ours, theirs in zip(("latents", "context"), *grads):
        assert rel_err(ours, theirs) < 1e-5, name
    try:
        for module in (sd.unet, ref):
            module.requires_grad_(True)
            (module(x, t, context) if module is sd.unet else module(x, t, context).sample).mul(weights).sum().backward()
        theirs = dict(ref.named_parameters())
        errors = {name: rel_err(p.grad, theirs[name].grad) for name, p in sd.unet.named_parameters()}
        print(f"\nworst weight gradient: {max(errors, key=errors.get)} {max(errors.values()):.2e}")
        assert len(errors) == len(theirs) and max(errors.values()) < 1e-5
    finally:
        for module in (sd.unet, ref):
            module.requires_grad_(False).zero_grad(set_to_none=True)
    ref = None  # not del: the lambda above closes over it
    gc.collect()


def test_vae_matches_diffusers(sd):
    from diffusers import AutoencoderKL

    ref = sharing_reference(lambda: AutoencoderKL.from_config(reference_config("vae")), sd.vae.state_dict())
    torch.manual_seed(0)
    images, z = torch.rand(1, 3, 256, 256) * 2 - 1, torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        start = time.perf_counter()
        check("VAE encode (1, 3, 256, 256)", sd.vae.encode(images), ref.encode(images).latent_dist.mean,
              time.perf_counter() - start)
        start = time.perf_counter()
        check("VAE decode (1, 4, 64, 64) -> 512 x 512", sd.vae.decode(z), ref.decode(z).sample,
              time.perf_counter() - start)
    del ref
    gc.collect()


def test_text_encoder_matches_transformers(sd):
    from transformers import CLIPTextConfig, CLIPTextModel

    # Built normally, not on meta: transformers keeps a position_ids buffer outside the state dict. 0.5 GB.
    ref = CLIPTextModel(CLIPTextConfig(**reference_config("text_encoder"))).eval()
    ours = sd.text_encoder.state_dict()
    if "text_model.final_layer_norm.weight" not in ref.state_dict():  # transformers 5 dropped the prefix in memory
        ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
    ref.load_state_dict(ours)
    ids = sd.tokenize(["a red cat", "cat", ""])
    start = time.perf_counter()
    with torch.no_grad():
        check("text encoder (3, 77) ids", sd.text_encoder(ids), ref(ids).last_hidden_state, time.perf_counter() - start)
    del ref
    gc.collect()


if __name__ == "__main__":  # python tests/test_1_model_full_size.py write DIR: the folder writer, run in its own process
    assert sys.argv[1] == "write"
    print(json.dumps(write_folder(sys.argv[2])))
