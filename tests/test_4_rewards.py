"""Rewards: jpeg sizes, the aesthetic scorer, LLaVA + BERTScore alignment and the async wrapper.

The learned rewards run on tiny random CLIP, LLaVA and DeBERTa models built here and saved with save_pretrained, so the
real loading path is exercised without downloads. Run: pytest tests/test_4_rewards.py
(the BERTScore oracle test needs `pip install bert-score` and is skipped without it).
"""
import time

import numpy as np
import pytest
import torch

from nanoddpo.cli import UsageError
from nanoddpo.rewards import REWARDS, AsyncReward, check_reward, get_reward, is_custom_reward, reward_label, write_answers

def random_images(n, h=64, w=64, seed=0):
    """Noise images, the same for a given seed whatever tests run before."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# jpeg rewards and the registry

def test_jpeg_rewards_rank_flat_above_noise():
    flat = np.full((1, 64, 64, 3), 128, dtype=np.uint8)
    images = np.concatenate([flat, random_images(1)])
    compress = get_reward("jpeg")(images, ["a", "b"])
    incompress = get_reward("jpeg-incompressibility")(images, ["a", "b"])
    assert compress.shape == (2,) and compress.dtype == np.float32
    assert compress[0] > compress[1]  # the flat image is smaller, so less negative
    assert incompress[1] > incompress[0]
    np.testing.assert_array_equal(compress, -incompress)


def test_jpeg_reward_is_the_papers_measure():
    # -(bytes of the JPEG at quality 95) / 1000, measured here with PIL directly: the quality matters (90 is smaller).
    import io
    from PIL import Image
    images = random_images(3)
    def kb(img, quality):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        return len(buf.getvalue()) / 1000
    expected = np.array([-kb(img, 95) for img in images], dtype=np.float32)
    np.testing.assert_array_equal(get_reward("jpeg")(images, ["p"] * 3), expected)
    assert all(kb(img, 90) < -e for img, e in zip(images, expected))


def test_images_are_rounded_to_uint8_as_a_file_stores_them():
    # Every reward sees to_uint8's pixels: round(255 x) clamped to 0..255, as the reference says (not truncated)
    from nanoddpo.images import to_uint8
    x = torch.tensor([0.4, 0.6, 127.7, 254.49, 300.0, -3.0]) / 255
    pixels = to_uint8(x.view(1, 1, 2, 3).expand(1, 3, 2, 3))  # (1, 3, 2, 3) -> (1, 2, 3, 3)
    np.testing.assert_array_equal(pixels[0, ..., 0].ravel(), [0, 1, 128, 254, 255, 0])


def test_unknown_reward_lists_choices():
    with pytest.raises(ValueError) as err:
        get_reward("nope")
    for name in ["jpeg", "jpeg-incompressibility", "aesthetic", "alignment"]:
        assert name in REWARDS and name in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# your own reward: path/to/file.py:function

CUSTOM = """
import numpy as np
import torch
def redness(images, prompts):
    return images[..., 0].mean(axis=(1, 2)) - images[..., 1:].mean(axis=(1, 2, 3))
def as_list(images, prompts):
    return [float(len(p)) for p in prompts]
def as_tensor(images, prompts):
    return torch.ones(len(images), dtype=torch.float16)
def wrong_shape(images, prompts):
    return np.zeros((len(images), 1))
def one_short(images, prompts):
    return np.zeros(len(images) - 1)
def integers(images, prompts):
    return np.zeros(len(images), dtype=np.int64)
def strings(images, prompts):
    return ["high"] * len(images)
def broken(images, prompts):
    return 1 / 0
NOT_A_FUNCTION = 3
"""


@pytest.fixture
def custom_file(tmp_path):
    (tmp_path / "my_reward.py").write_text(CUSTOM)
    return tmp_path / "my_reward.py"


def test_custom_reward_from_a_file(custom_file):
    images, prompts = random_images(3), ["a", "bb", "ccc"]
    images[0, ..., 0] = 255  # the first image is redder
    name = f"{custom_file}:redness"
    assert is_custom_reward(name) and not is_custom_reward("jpeg") and reward_label(name) == "my_reward-redness"
    check_reward(name, prompts)
    scores = get_reward(name)(images, prompts)
    assert scores.shape == (3,) and scores.dtype == np.float32 and scores.argmax() == 0
    np.testing.assert_array_equal(get_reward(f"{custom_file}:as_list")(images, prompts), [1, 2, 3])
    np.testing.assert_array_equal(get_reward(f"{custom_file}:as_tensor")(images, prompts), [1, 1, 1])


@pytest.mark.parametrize("function, error, message", [
    ("wrong_shape", UsageError, r"my_reward.py:wrong_shape returned shape \(3, 1\) for 3 images; expected a float array"),
    ("one_short", UsageError, r"my_reward.py:one_short returned shape \(2,\) for 3 images; expected a float array"),
    ("integers", UsageError, r"my_reward.py:integers returned ndarray of dtype int64; expected a float array of shape \(3,\)"),
    ("strings", UsageError, r"my_reward.py:strings returned list of dtype <U4"),
    ("broken", UsageError, r"my_reward.py:broken raised ZeroDivisionError: division by zero"),
])
def test_custom_reward_bad_results_name_the_function(custom_file, function, error, message):
    reward = get_reward(f"{custom_file}:{function}")
    with pytest.raises(error, match=message):
        reward(random_images(3), ["a", "b", "c"])


def test_custom_reward_load_errors(custom_file, tmp_path):
    with pytest.raises(ValueError, match=r"no file .*missing.py"):
        get_reward(f"{tmp_path / 'missing.py'}:score")
    with pytest.raises(ValueError, match=r"nope is not defined in .*my_reward.py \(its functions: redness, as_list"):
        check_reward(f"{custom_file}:nope", ["p"])
    with pytest.raises(ValueError, match="NOT_A_FUNCTION is not a function"):
        get_reward(f"{custom_file}:NOT_A_FUNCTION")
    (tmp_path / "bad.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ValueError, match=r"bad.py:score: importing .*bad.py raised ModuleNotFoundError"):
        get_reward(f"{tmp_path / 'bad.py'}:score")
    with pytest.raises(ValueError, match="^--reward jpg: choose one of jpeg, .*, or your own path/to/file.py:func"):
        check_reward("jpg", ["p"])
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\ndef score(images, prompts):\n    sys.exit(3)\n")
    with pytest.raises(UsageError, match=r"exits.py:score: importing .*exits.py raised SystemExit: 0"):
        get_reward(f"{tmp_path / 'exits.py'}:score")  # sys.exit() would end training silently, with status 0
    (tmp_path / "exits.py").write_text("import sys\ndef score(images, prompts):\n    sys.exit(3)\n")
    with pytest.raises(UsageError, match=r"exits.py:score raised SystemExit: 3"):
        get_reward(f"{tmp_path / 'exits.py'}:score")(random_images(1), ["p"])


# ---------------------------------------------------------------------------------------------------------------------
# what the alignment reward saw: answers.jsonl

class StubAnswers:
    """Stands in for AlignmentReward: the (prompt, answer, score) triples it gathered during an epoch."""

    def __init__(self, n):
        self.answers = [(f"prompt {i}", f"answer {i}", i / 10) for i in range(n)]

    def take_answers(self):
        answers, self.answers = self.answers, []
        return answers


def test_write_answers_keeps_a_few_per_epoch(tmp_path):
    import json
    path = tmp_path / "answers.jsonl"
    assert write_answers(StubAnswers(10), path, epoch=0, k=4) == 4
    assert write_answers(StubAnswers(2), path, epoch=1, k=4) == 2
    assert write_answers(StubAnswers(0), path, epoch=2) == 0 and write_answers(get_reward("jpeg"), path, epoch=2) == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["epoch"], r["prompt"]) for r in lines] == [(0, "prompt 0"), (0, "prompt 3"), (0, "prompt 6"),
                                                          (0, "prompt 9"), (1, "prompt 0"), (1, "prompt 1")]
    assert lines[1] == {"epoch": 0, "prompt": "prompt 3", "answer": "answer 3", "score": 0.3}


# AsyncReward

def test_async_reward_keeps_batches_paired():
    delays = [0.08, 0.0, 0.05, 0.01, 0.03]  # some later batches finish faster, so a mix-up would show

    def score(images, prompts):  # depends on every pixel and every prompt
        return np.array([img.mean() + len(p) for img, p in zip(images, prompts)], dtype=np.float32)

    def slow_reward(images, prompts):
        time.sleep(delays[int(images[0, 0, 0, 0])])
        return score(images, prompts)

    scorer = AsyncReward(slow_reward)
    rng = np.random.default_rng(0)
    buffer = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    expected, futures = [], []
    for k in range(len(delays)):
        buffer[:] = rng.integers(0, 256, buffer.shape)
        buffer[0, 0, 0, 0] = k
        prompts = [f"batch {k} image {i}" + "!" * rng.integers(10) for i in range(3)]
        expected.append(score(buffer, prompts))
        futures.append(scorer.submit(buffer, prompts))  # the buffer is overwritten next: submit must copy it
    for future, want in zip(futures, expected):
        np.testing.assert_array_equal(future.result(timeout=10), want)
    scorer.close()


def test_async_reward_raises_in_caller():
    def broken(images, prompts):
        raise RuntimeError("reward failed")

    scorer = AsyncReward(broken)
    with pytest.raises(RuntimeError, match="reward failed"):
        scorer.submit(random_images(1), ["a"]).result(timeout=10)
    scorer.close()


def test_async_reward_thread_uses_the_callers_gpu(monkeypatch):
    """The scoring thread must start on the caller's CUDA device (cuda:LOCAL_RANK under torchrun), not on cuda:0,
    where a new thread starts. CUDA is mocked: the test records which device the worker thread selects."""
    import threading
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: selected.append((threading.current_thread().name, d)))
    scorer = AsyncReward(lambda images, prompts: np.zeros(len(images), dtype=np.float32))
    scorer.submit(random_images(1), ["a"]).result(timeout=10)
    scorer.close()
    assert len(selected) == 1 and selected[0][0].startswith("reward") and selected[0][1] == 2


# ---------------------------------------------------------------------------------------------------------------------
# aesthetic

PUBLISHED_MLP_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    """A tiny random CLIP (projection to 768, as ViT-L/14) and a random predictor saved as the published .pth."""
    from transformers import CLIPConfig, CLIPModel

    from nanoddpo.learned_rewards import AestheticMLP
    folder = tmp_path_factory.mktemp("aesthetic")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(tower, image_size=224, patch_size=32), projection_dim=768)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder / "clip")
    mlp = AestheticMLP()
    with torch.no_grad():  # default init shrinks through five layers; make the score vary visibly between images
        for p in mlp.parameters():
            p.mul_(4.0)
    torch.save(mlp.state_dict(), folder / "mlp.pth")
    return folder


def test_aesthetic_mlp_has_published_names(tiny_aesthetic):
    from nanoddpo.learned_rewards import AestheticMLP
    state = torch.load(tiny_aesthetic / "mlp.pth", weights_only=True)
    assert list(state) == PUBLISHED_MLP_KEYS
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    mlp = AestheticMLP.load(tiny_aesthetic / "mlp.pth")  # strict
    for key, value in mlp.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    from safetensors.torch import save_file
    save_file(state, tiny_aesthetic / "mlp.safetensors")
    for key, value in AestheticMLP.load(tiny_aesthetic / "mlp.safetensors").state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        torch.save(dict(state, extra=torch.zeros(1)), tiny_aesthetic / "bad.pth")
        AestheticMLP.load(tiny_aesthetic / "bad.pth")


@pytest.mark.parametrize("h, w", [(512, 512), (300, 400), (250, 200), (200, 200), (277, 277), (300, 500),
                                  (600, 256), (513, 389), (389, 513), (225, 601)])
def test_clip_preprocess_matches_clip_image_processor(h, w):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from nanoddpo.learned_rewards import clip_preprocess
    processor = CLIPImageProcessorPil()  # defaults are openai/clip-vit-large-patch14's preprocessor_config.json
    # 277 x 277 is the case that once came out (3, 224, 1): 277 * (224 / 277) = 223.99999... was truncated to 223;
    # tall ones (600 x 256) are those the installed Pillow resizes height first
    images = random_images(2, h, w)  # noise: the hardest case for resampling
    want = processor(images=list(images), return_tensors="pt")["pixel_values"]
    got = clip_preprocess(images)
    assert got.shape == want.shape == (2, 3, 224, 224)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # the same pixels: not even one grey level (0.015) apart


def test_aesthetic_reward_matches_transformers_pipeline(tiny_aesthetic):
    from transformers import CLIPImageProcessor, CLIPModel

    from nanoddpo.learned_rewards import AestheticMLP, AestheticReward
    reward = AestheticReward(tiny_aesthetic / "clip", tiny_aesthetic / "mlp.pth", device="cpu", dtype=torch.float32)
    images = random_images(3, 128, 96)
    scores = reward(images, ["a cat"] * 3)
    assert scores.shape == (3,) and scores.dtype == np.float32
    # the same score through transformers' own preprocessing and CLIPModel.get_image_features
    clip = CLIPModel.from_pretrained(tiny_aesthetic / "clip").eval()
    pixels = CLIPImageProcessor()(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embed = clip.get_image_features(pixel_values=pixels).pooler_output
        want = AestheticMLP.load(tiny_aesthetic / "mlp.pth")(embed / embed.norm(dim=-1, keepdim=True)).squeeze(1)
    assert want.std() > 0.01  # the images get distinguishable scores, so the comparison means something
    np.testing.assert_allclose(scores, want.numpy(), atol=2e-3 * float(want.abs().max()))
    # batching and determinism: a batch of 3 equals three batches of 1, and a second call equals the first
    singles = np.concatenate([reward(images[i:i + 1], ["a cat"]) for i in range(3)])
    np.testing.assert_allclose(singles, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reward(images, ["a cat"] * 3), scores)


def test_aesthetic_head_stays_fp32_under_a_bf16_tower(tiny_aesthetic):
    """On CUDA the tower runs in bf16; the projection and the MLP must not, or a score near 5.5 moves in steps of
    2**-5 = 0.031. Here on CPU with dtype=bf16, which is what CUDA gets by default."""
    from nanoddpo.learned_rewards import AestheticReward
    fp32 = AestheticReward(tiny_aesthetic / "clip", tiny_aesthetic / "mlp.pth", device="cpu", dtype=torch.float32)
    bf16 = AestheticReward(tiny_aesthetic / "clip", tiny_aesthetic / "mlp.pth", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.vision.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.projection.parameters()} | {p.dtype for p in bf16.mlp.parameters()} == {torch.float32}
    # 100 pooled tower outputs through the head: fp32 maths, checked against float64, and a continuum of values
    pooled = torch.randn(100, bf16.vision.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # scores of 5.5 +- a few tenths, as the real predictor gives
        fp32.mlp.layers[7].weight *= 0.2
        fp32.mlp.layers[7].bias += 5.5 - fp32.head(pooled).mean()
        bf16.mlp.load_state_dict(fp32.mlp.state_dict())
        got = bf16.head(pooled.to(torch.bfloat16))
        embed = bf16.projection.double()(pooled.to(torch.bfloat16).double())
        want = bf16.mlp.double()(embed / embed.norm(dim=-1, keepdim=True)).squeeze(1)
        bf16.projection.float(), bf16.mlp.float()
    assert got.dtype == torch.float32 and 5 < got.mean() < 6 and 0.1 < got.std() < 1
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)  # bf16 maths would be 0.03 off
    assert len(set(got.tolist())) > 90
    # on images: the bf16-tower score is the fp32 head applied to the bf16 tower's output, so it differs from the
    # all-fp32 score only by the tower's rounding
    images = random_images(8, 96, 128)
    scores = bf16(images)
    assert scores.dtype == np.float32 and len(set(scores.tolist())) == 8
    from nanoddpo.learned_rewards import clip_preprocess
    with torch.no_grad():
        tower = bf16.vision(pixel_values=clip_preprocess(images).to(torch.bfloat16)).pooler_output
        np.testing.assert_allclose(scores, fp32.head(tower).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, fp32(images), atol=0.05 * float(np.ptp(fp32(images))))


def test_reward_device_is_this_process_gpu(monkeypatch):
    """Rewards score on AsyncReward's thread, whose current CUDA device is 0: a bare "cuda" there is cuda:0 whatever
    the rank. The default must be cuda:LOCAL_RANK, and a bare "cuda" must be pinned to it too."""
    from nanoddpo.learned_rewards import default_device_dtype, resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device() == torch.device("cuda", 1) and resolve_device().index == 1
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 2)) == torch.device("cuda", 2)  # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert default_device_dtype(None, None) == (torch.device("cuda", 1), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no bf16 tensor cores
    assert default_device_dtype("cuda", None) == (torch.device("cuda", 1), torch.float16)
    assert default_device_dtype("cuda", torch.float32) == (torch.device("cuda", 1), torch.float32)  # the caller's
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device() == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device() == torch.device("cuda", 0)  # not torchrun: the first GPU, still with its index
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device_dtype(None, None) == (torch.device("cpu"), torch.float32)


def test_reward_models_go_to_the_resolved_device(monkeypatch, tiny_aesthetic, tiny_llava, tiny_deberta):
    """Under torchrun rank 3 with CUDA (mocked: Module.to only records where it was sent), every model of both
    learned rewards is sent to cuda:3, never to a bare "cuda"."""
    from nanoddpo.learned_rewards import AestheticReward, AlignmentReward
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("LOCAL_RANK", "3")
    sent = []

    def record(module, *args, **kwargs):
        sent.extend(a for a in [*args, kwargs.get("device")] if isinstance(a, (str, torch.device)))
        return module

    monkeypatch.setattr(torch.nn.Module, "to", record)
    aesthetic = AestheticReward(tiny_aesthetic / "clip", tiny_aesthetic / "mlp.pth")
    alignment = AlignmentReward(tiny_llava, tiny_deberta, bert_layer=2)
    assert aesthetic.device == alignment.device == alignment.bertscore.device == torch.device("cuda", 3)
    assert len(sent) >= 5 and all(torch.device(d) == torch.device("cuda", 3) for d in sent), sent


def test_reward_tensors_follow_the_model_device(tiny_aesthetic, tiny_llava, tiny_deberta, monkeypatch):
    """Every tensor a reward makes must go to the reward's own device. On the meta device any tensor left on the
    default device (the CPU here, cuda:0 on a GPU) meets a meta weight and raises, so running the whole path there
    checks it without a GPU."""
    from nanoddpo.learned_rewards import AestheticReward, AlignmentReward
    meta = torch.device("meta")
    aesthetic = AestheticReward(tiny_aesthetic / "clip", tiny_aesthetic / "mlp.pth", device=meta, dtype=torch.bfloat16)
    scores = aesthetic.score(random_images(3, 100, 90))
    assert scores.device == meta and scores.shape == (3,) and scores.dtype == torch.float32

    alignment = AlignmentReward(tiny_llava, tiny_deberta, bert_layer=2, device=meta, dtype=torch.float32)
    recall = alignment.bertscore.recall_tensor(CANDIDATES, REFERENCES)
    assert recall.device == meta and recall.shape == (5,)
    seen = {}

    def generate(**inputs):  # LLaVA's generate cannot run on meta; check what it is given instead
        seen.update({k: v.device for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return torch.full((len(inputs["input_ids"]), inputs["input_ids"].shape[1] + 2), 18)  # "cat cat"

    monkeypatch.setattr(alignment.llava, "generate", generate)
    assert alignment.describe(random_images(2)) == ["cat cat"] * 2
    assert {"input_ids", "attention_mask", "pixel_values"} <= set(seen) and set(seen.values()) == {meta}


def test_aesthetic_missing_weights_error(tmp_path, tiny_aesthetic):
    from nanoddpo.learned_rewards import AestheticReward
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14") as err:
        AestheticReward(tmp_path / "clip-vit-large-patch14", tiny_aesthetic / "mlp.pth", device="cpu")
    assert str(tmp_path / "clip-vit-large-patch14") in str(err.value) and "hf download" in str(err.value)
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor") as err:
        AestheticReward(tiny_aesthetic / "clip", tmp_path / "sac+logos+ava1-l14-linearMSE.pth", device="cpu")
    assert "wget" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# alignment: BERTScore and LLaVA

@pytest.fixture(scope="module")
def tiny_deberta(tmp_path_factory):
    """A tiny random DeBERTa (v1, relative attention, as deberta-xlarge-mnli) with a byte-level BPE tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import DebertaConfig, DebertaModel, DebertaTokenizer
    folder = tmp_path_factory.mktemp("deberta")
    merges = ["Ġ c", "a t", "Ġc at", "Ġ a", "i n", "Ġ t", "h e", "Ġt he"]
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab += ["".join(m.split()) for m in merges]
    DebertaTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges],
                     model_max_length=512).save_pretrained(folder)
    config = DebertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                           pos_att_type=["c2p", "p2c"], max_relative_positions=-1, position_biased_input=False,
                           pad_token_id=0, type_vocab_size=0)
    torch.manual_seed(0)
    DebertaModel(config).save_pretrained(folder)
    return folder


# " ant\n": bert-score strips surrounding whitespace before tokenizing, and so must we
CANDIDATES = ["a cat riding a bike", " ant\n", "the cat", "dog dog dog playing chess in the kitchen", "x"]
REFERENCES = ["The image contains a cat riding a bike", "The image contains an ant", "The image contains a cat",
              "The image contains a dog playing chess", "The image contains a fish"]


def test_bertscore_identical_texts_score_one(tiny_deberta):
    from nanoddpo.learned_rewards import BERTScore
    bertscore = BERTScore(tiny_deberta, layer=2, device="cpu")
    np.testing.assert_allclose(bertscore.recall(REFERENCES, REFERENCES), 1.0, atol=1e-5)
    recall = bertscore.recall(CANDIDATES, REFERENCES)
    assert recall.shape == (5,) and recall.dtype == np.float32 and (recall < 0.999).all()
    assert bertscore.recall([""], ["The image contains a cat"])[0] == 0  # bert-score's rule for an empty answer
    # Dropping the blocks above the scored layer leaves exactly the full model's hidden state after that layer.
    from transformers import AutoModel, AutoTokenizer
    assert len(bertscore.model.encoder.layer) == 2
    full = AutoModel.from_pretrained(tiny_deberta).eval()
    batch = AutoTokenizer.from_pretrained(tiny_deberta)(REFERENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = full(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    want = out.hidden_states[2]
    got, mask, weight = bertscore.embed(REFERENCES)
    torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=-1), rtol=1e-5, atol=1e-5)
    assert (weight.sum(1) == mask.sum(1) - 2).all()  # [CLS] and [SEP] carry no weight


def test_bertscore_matches_bert_score_package(tiny_deberta):
    bert_score = pytest.importorskip("bert_score")
    from nanoddpo.learned_rewards import BERTScore
    ours = BERTScore(tiny_deberta, layer=2, device="cpu").recall(CANDIDATES, REFERENCES)
    # batch_size=1: bert-score zeroes padded similarities instead of excluding them, which changes its result in a
    # padded batch when every similarity of a token is negative (possible in a random model, not in a trained one).
    _, want, _ = bert_score.score(CANDIDATES, REFERENCES, model_type=str(tiny_deberta), num_layers=2, idf=False,
                                  device="cpu", batch_size=1)
    assert want.std() > 0.1  # the encoder separates these pairs, so agreement is not trivial
    np.testing.assert_allclose(ours, want.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A tiny random LLaVA (CLIP vision tower + Llama) and its processor, in llava-1.5-7b-hf's layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)
    folder = tmp_path_factory.mktemp("llava")
    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:", "Answer", "concisely:", "what", "is",
             "going", "on", "in", "this", "image?", "a", "an", "cat", "dog", "ant", "riding", "bike", "the", "image",
             "contains", "playing", "chess", "washing", "dishes"]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # As llava-1.5-7b-hf: patch 14, CLS dropped ("default"), so a 28 x 28 image becomes 2 x 2 = 4 <image> tokens.
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = LlavaConfig(
        vision_config=dict(tower, model_type="clip_vision_model", image_size=28, patch_size=14),
        text_config=dict(tower, model_type="llama", vocab_size=len(words), num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=words.index("<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_alignment_asks_the_references_question():
    # The reference: LLaVA answers "Answer concisely: what is going on in this image?", greedy, up to 64 tokens, in
    # LLaVA-1.5's one-turn conversation format (llava-1.5-7b-hf's model card: "USER: <image>\n<prompt> ASSISTANT:")
    import inspect
    from nanoddpo import learned_rewards
    assert learned_rewards.QUESTION == "Answer concisely: what is going on in this image?"
    assert learned_rewards.LLAVA_PROMPT == "USER: <image>\nAnswer concisely: what is going on in this image? ASSISTANT:"
    assert inspect.signature(learned_rewards.AlignmentReward).parameters["max_new_tokens"].default == 64
    # BERTScore reads deberta-xlarge-mnli's hidden states after block 40 of 48 (bert-score's model2layers)
    assert inspect.signature(learned_rewards.AlignmentReward).parameters["bert_layer"].default == 40


def test_alignment_reward(tiny_llava, tiny_deberta):
    from nanoddpo.learned_rewards import AlignmentReward
    reward = AlignmentReward(tiny_llava, tiny_deberta, bert_layer=2, device="cpu", dtype=torch.float32,
                             max_new_tokens=8)
    images = random_images(3)
    # LLaVA sees each image as the reference sends it: a JPEG of quality 80, decoded
    import io
    from PIL import Image
    seen, processor = [], reward.processor
    class Spy:
        def __getattr__(self, name):
            return getattr(processor, name)
        def __call__(self, images, **kwargs):
            seen.extend(np.asarray(img) for img in images)
            return processor(images=images, **kwargs)
    reward.processor = Spy()
    reward.describe(images)
    reward.processor = processor
    for img, got in zip(images, seen):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=80)
        np.testing.assert_array_equal(got, np.asarray(Image.open(buf).convert("RGB")))
    prompts = ["a cat riding a bike", "an ant playing chess", "a dog washing the dishes"]
    answers = reward.describe(images)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert len(set(answers)) > 1  # the answer depends on the image
    scores = reward(images, prompts)
    assert scores.shape == (3,) and scores.dtype == np.float32 and ((-1 <= scores) & (scores <= 1)).all()
    np.testing.assert_allclose(
        scores, reward.bertscore.recall(answers, [f"The image contains {p}" for p in prompts]), atol=1e-6)
    # batching and determinism: a batch of 3 equals three batches of 1, and a second call equals the first
    assert [reward.describe(images[i:i + 1])[0] for i in range(3)] == answers
    singles = [reward.bertscore.recall(answers[i:i + 1], [f"The image contains {prompts[i]}"]) for i in range(3)]
    np.testing.assert_allclose(np.concatenate(singles), scores, atol=1e-5)
    np.testing.assert_array_equal(reward(images, prompts), scores)
    # every scored image's prompt, answer and score is kept for answers.jsonl, then handed over once
    kept = reward.take_answers()
    assert kept == [(p, a, s) for p, a, s in zip(prompts, answers, scores.tolist())] * 2 and reward.take_answers() == []


def test_alignment_missing_weights_error(tmp_path, tiny_llava, tiny_deberta):
    from nanoddpo.learned_rewards import AlignmentReward
    with pytest.raises(FileNotFoundError, match="llava-1.5-7b-hf") as err:
        AlignmentReward(tmp_path / "llava-1.5-7b-hf", tiny_deberta, device="cpu")
    assert str(tmp_path / "llava-1.5-7b-hf") in str(err.value)
    assert "hf download llava-hf/llava-1.5-7b-hf" in str(err.value)
    with pytest.raises(FileNotFoundError, match="hf download microsoft/deberta-xlarge-mnli"):
        AlignmentReward(tiny_llava, tmp_path / "deberta-xlarge-mnli", device="cpu")


def test_registry_factories_name_missing_folders():
    from nanoddpo.rewards import WEIGHTS
    for name, folder in [("aesthetic", "clip-vit-large-patch14"), ("alignment", "llava-1.5-7b-hf")]:
        if (WEIGHTS / folder).exists():
            continue  # downloaded here: the factory would load the real model
        with pytest.raises(FileNotFoundError, match=folder):
            get_reward(name)


# ---------------------------------------------------------------------------------------------------------------------
# check_reward: a wrong reward setting fails before any model loads

def test_check_reward_unknown_name_lists_choices():
    from nanoddpo.rewards import check_reward
    with pytest.raises(ValueError) as err:
        check_reward("aesthetics", ["cat"])
    assert str(err.value).startswith("--reward aesthetics: choose one of ")
    assert all(name in str(err.value) for name in REWARDS)
    check_reward("jpeg", ["cat", "tench, Tinca tinca"])  # the jpeg rewards score any prompt
    check_reward("jpeg-incompressibility", ["cat"])
    with pytest.raises(UsageError, match="no file my_rewards.py"):  # a custom reward is checked by loading it
        check_reward("my_rewards.py:score", ["cat"])


def test_check_reward_tinyworld_needs_its_own_prompts():
    from nanoddpo import world
    from nanoddpo.prompts import simple_animals
    from nanoddpo.rewards import check_reward
    check_reward("tinyworld", world.PROMPTS)
    with pytest.raises(ValueError) as err:
        check_reward("tinyworld", world.PROMPTS[:5] + simple_animals())
    message = str(err.value)
    assert "45 of 50 prompts are not" in message and "'cat', 'dog', 'horse'" in message and "'rabbit'" not in message
    assert "'a red circle on a plain background'" in message  # what a prompt of the tiny world looks like
    with pytest.raises(ValueError, match="1 of 1 prompts"):
        check_reward("tinyworld", ["a pink circle on a plain background"])  # no pink in the world


def test_check_reward_names_missing_weights(tmp_path, monkeypatch):
    import inspect

    from nanoddpo import rewards
    from nanoddpo.learned_rewards import AestheticReward, AlignmentReward
    # the files checked are the ones the rewards load by default
    defaults = {**inspect.signature(AestheticReward).parameters, **inspect.signature(AlignmentReward).parameters}
    assert [path for path, _ in rewards.WEIGHT_FILES["aesthetic"] + rewards.WEIGHT_FILES["alignment"]] == [
        defaults[name].default for name in ("clip_dir", "mlp_path", "llava_dir", "bert_dir")]

    clip, mlp = tmp_path / "clip-vit-large-patch14", tmp_path / "aesthetic-predictor" / "predictor.pth"
    clip.mkdir()
    monkeypatch.setitem(rewards.WEIGHT_FILES, "aesthetic",
                        [(clip, "clip-vit-large-patch14"), (mlp, "aesthetic-predictor")])
    with pytest.raises(ValueError) as err:
        rewards.check_reward("aesthetic", ["cat"])
    message = str(err.value)
    assert f"reward aesthetic needs {mlp}, not downloaded" in message
    assert rewards.DOWNLOADS["aesthetic-predictor"] in message
    assert "openai/clip-vit-large-patch14" not in message  # the folder that is there is not asked for
    mlp.parent.mkdir()
    mlp.write_bytes(b"")
    rewards.check_reward("aesthetic", ["cat"])

    llava, bert = tmp_path / "llava-1.5-7b-hf", tmp_path / "deberta-xlarge-mnli"
    monkeypatch.setitem(rewards.WEIGHT_FILES, "alignment", [(llava, "llava-1.5-7b-hf"), (bert, "deberta-xlarge-mnli")])
    with pytest.raises(ValueError) as err:
        rewards.check_reward("alignment", ["a cat riding a bike"])
    assert f"needs {llava}, {bert}" in str(err.value)
    assert all(rewards.DOWNLOADS[key] in str(err.value) for key in ("llava-1.5-7b-hf", "deberta-xlarge-mnli"))
