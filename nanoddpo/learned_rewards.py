"""
Learned rewards for DDPO: the LAION aesthetic score and VLM prompt alignment (LLaVA's answer scored by BERTScore).

- aesthetic (the DDPO paper's aesthetic quality task): CLIP ViT-L/14 projected image embedding, L2-normalised, into
  the LAION "improved aesthetic predictor" (a linear MLP trained on SAC + LOGOS + AVA ratings; scores on a 1-10 scale).
- alignment (the DDPO paper's automated prompt alignment task): LLaVA-1.5 answers "Answer concisely: what is going on in
  this image?"; the reward is the BERTScore recall of that answer against "The image contains <prompt>", with the
  bert-score package's settings for microsoft/deberta-xlarge-mnli (hidden states after layer 40, no idf, no rescaling).

Every model loads from a local folder under weights/ (weights/README.md says how to fetch each); nothing is
downloaded at run time. Use them through nanoddpo.rewards.get_reward("aesthetic" | "alignment"); check_reward there
looks for their files (WEIGHT_FILES) before anything loads.

Devices: every model and every tensor of a reward lives on one device with an explicit index, by default this process's
own GPU (cuda:LOCAL_RANK under torchrun) or the CPU; never a bare "cuda", which on AsyncReward's scoring thread means
cuda:0 (see resolve_device).
Tests: pytest tests/test_4_rewards.py
"""
import io
import os
import threading
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer, CLIPModel, LlavaForConditionalGeneration

from nanoddpo.cli import auto_precision, torch_dtype
# Where each model is looked for, and the command that fetches it: in nanoddpo/rewards.py, so that check_reward can look
# for the files before anything heavy is imported.
from nanoddpo.rewards import AESTHETIC_MLP, CLIP_DIR, DEBERTA_DIR, DOWNLOADS, LLAVA_DIR


def require(path, name):
    """Fail early, naming the missing folder or file and the command that fetches it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reward model not found: {path}\nfetch it, from the repository root, with:\n"
                                f"    {DOWNLOADS[name]}\n(see weights/README.md)")
    return path


def resolve_device(device=None):
    """The device of a reward's models and of every tensor it makes: `device` if given, else this process's own,
    cuda:LOCAL_RANK (torchrun sets LOCAL_RANK; 0 without it) when there is a GPU, else cpu.

    A bare "cuda" is pinned to cuda:LOCAL_RANK too. Rewards run on AsyncReward's background thread, and a thread's
    current CUDA device starts at 0 whatever the main thread chose: there "cuda" would mean cuda:0 while rank r's model
    sits on cuda:r, and every rank but 0 would fail on mixed devices."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def default_device_dtype(device, dtype):
    """resolve_device(device), and the dtype train.py's --precision auto picks there (bf16 on GPUs from Ampere on, fp16
    before them, fp32 on a CPU), unless the caller says otherwise."""
    device = resolve_device(device)
    return device, dtype or torch_dtype(auto_precision(device))


# ---------------------------------------------------------------------------------------------------------------------
# Aesthetic score

# CLIPImageProcessor's numbers for openai/clip-vit-large-patch14 (preprocessor_config.json).
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size=CLIP_SIZE, device="cpu"):
    """uint8 (B, H, W, 3) -> normalised float (B, 3, size, size) on `device`, as CLIPImageProcessor makes it.

    CLIPImageProcessor resizes the shortest edge to 224 with PIL's bicubic filter (the long edge to
    int(224 * long / short)), centre-crops 224 x 224, scales to [0, 1] and normalises. The resize here is PIL's own, on
    the CPU, so it agrees exactly whatever the image size and Pillow version: PIL resizes in two one-dimensional passes,
    rounding to uint8 after each, and the installed Pillow (13) chooses their order by the image's shape, which a torch
    resize on the GPU would have to guess (the wrong order differs by up to 23 grey levels on noise, one float pass by
    20). It costs a few milliseconds of CPU per 512 x 512 image, on the reward's own thread.
    """
    crops = []
    for img in np.asarray(images):
        h, w = img.shape[:2]
        # The long edge as transformers computes it: int(size * long / short). (Scaling by size / short first can land
        # just below a whole number: 277 * (224 / 277) = 223.99999..., which int() takes to 223.)
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        img = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crops.append(img[top:top + size, left:left + size])
    x = torch.as_tensor(np.stack(crops), device=device).permute(0, 3, 1, 2).float()  # (B, 3, size, size)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (its class `MLP`). No activations: it is one linear map, factored;
    the dropouts only mattered in training. Attribute names match the published file, so it loads strictly."""

    def __init__(self, embed_dim=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed):
        return self.layers(embed)

    @classmethod
    def load(cls, path):
        """From the published .pth state dict (read with weights_only: tensors only, no pickled code) or a .safetensors
        copy with the same keys."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        mlp = cls(embed_dim=state["layers.0.weight"].shape[1])
        mlp.load_state_dict(state)  # strict: every published tensor used, every parameter filled
        return mlp.eval()  # dropout off: it is a scorer now


class AestheticReward:
    """reward(images, prompts) -> LAION aesthetic score per image (prompts are ignored). Counterpart of ddpo-pytorch's
    aesthetic_score / AestheticScorer.

    Precision: CLIP's vision tower (303 M parameters, nearly all the compute) runs in `dtype`, by default bf16 on a GPU
    (fp16 before Ampere) for speed and memory; everything from its pooled output on (the visual projection, the L2
    normalisation and the MLP head) runs in fp32 on every device, as the authors score. In bf16 the head's output,
    about 5 to 6, could only move in steps of 2**-5 = 0.031 (8 significant bits), a grid as coarse as the differences
    between samples of one prompt that the advantages compare; the tower's bf16 rounding only perturbs the embedding a
    little, continuously.
    """

    def __init__(self, clip_dir=CLIP_DIR, mlp_path=AESTHETIC_MLP, device=None, dtype=None):
        self.device, self.dtype = default_device_dtype(device, dtype)
        clip_dir, mlp_path = require(clip_dir, "clip-vit-large-patch14"), require(mlp_path, "aesthetic-predictor")
        clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
        # Only the image tower and its projection are used; the text tower (123 M parameters) is dropped here.
        self.vision = clip.vision_model.to(self.device, self.dtype).eval()
        self.projection = clip.visual_projection.to(self.device, torch.float32).eval()
        self.mlp = AestheticMLP.load(mlp_path).to(self.device, torch.float32)

    def head(self, pooled):
        """The tower's pooled output (B, 1024) -> scores (B,), in fp32 whatever the tower's dtype."""
        embed = self.projection(pooled.float())  # (B, 768), CLIP's image_embeds
        return self.mlp(embed / embed.norm(dim=-1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def score(self, images):
        """uint8 (B, H, W, 3) -> fp32 scores (B,) on self.device."""
        pixels = clip_preprocess(images, device=self.device).to(self.dtype)
        return self.head(self.vision(pixel_values=pixels).pooler_output)

    def __call__(self, images, prompts=None):
        return self.score(images).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Prompt alignment: LLaVA describes the image, BERTScore compares the description with the prompt

QUESTION = "Answer concisely: what is going on in this image?"
# LLaVA-1.5's conversation format: what its chat template writes for one user turn holding an image and a question.
LLAVA_PROMPT = f"USER: <image>\n{QUESTION} ASSISTANT:"


class BERTScore:
    """BERTScore recall (Zhang et al. 2020) as the bert-score package computes it with idf=False, no rescaling.

    Each text is encoded to contextual token embeddings (the hidden states after `layer` blocks); recall matches every
    reference token to its most similar candidate token by cosine similarity and averages those maxima over the
    reference tokens, [CLS] and [SEP] excluded from the average. As in bert-score, [CLS] and [SEP] of the candidate
    may still be matched, and an empty candidate scores 0.
    """

    def __init__(self, path, layer, device=None, dtype=torch.float32):
        self.device, self.dtype = default_device_dtype(device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        # bert-score reads the output of block `layer` (40 of 48 for deberta-xlarge-mnli). The blocks above it change
        # nothing that is read, so dropping them gives the same numbers with a sixth less memory and compute.
        model.encoder.layer = model.encoder.layer[:layer]
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def embed(self, texts):
        """-> unit-norm token embeddings (B, T, D), padding mask (B, T), averaging weights (B, T)."""
        batch = self.tokenizer([t.strip() for t in texts], padding=True, truncation=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device).bool()
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        special = (ids == self.tokenizer.cls_token_id) | (ids == self.tokenizer.sep_token_id)
        return F.normalize(hidden, dim=-1), mask, (mask & ~special).float()

    def recall(self, candidates, references):
        """BERTScore recall of each candidate against its reference -> float32 numpy (B,)."""
        return self.recall_tensor(candidates, references).cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def recall_tensor(self, candidates, references):
        """The same as a (B,) tensor on self.device."""
        cand, cand_mask, _ = self.embed(candidates)
        ref, _, ref_weight = self.embed(references)
        sim = ref @ cand.transpose(1, 2)  # (B, ref tokens, candidate tokens) cosine similarities
        sim = sim.masked_fill(~cand_mask[:, None, :], -torch.inf)  # padding is never a match
        best = sim.max(dim=2).values  # (B, ref tokens): each reference token's closest candidate token
        recall = (best * ref_weight).sum(1) / ref_weight.sum(1)
        empty = cand_mask.sum(1) <= 2  # only [CLS] [SEP]
        return recall.masked_fill(empty, 0.0)


class AlignmentReward:
    """reward(images, prompts) -> BERTScore recall of LLaVA's description against "The image contains <prompt>".
    Counterpart of ddpo-pytorch's llava_bertscore, which calls a separate LLaVA server; here both models are in-process.
    """

    def __init__(self, llava_dir=LLAVA_DIR, bert_dir=DEBERTA_DIR, bert_layer=40,
                 device=None, dtype=None, max_new_tokens=64):
        self.device, self.dtype = default_device_dtype(device, dtype)
        self.max_new_tokens = max_new_tokens
        llava_dir = require(llava_dir, "llava-1.5-7b-hf")
        require(bert_dir, "deberta-xlarge-mnli")
        self.processor = AutoProcessor.from_pretrained(llava_dir, local_files_only=True)
        # Decoder-only generation continues from the last position, so a batch is padded on the left.
        self.processor.tokenizer.padding_side = "left"
        self.llava = LlavaForConditionalGeneration.from_pretrained(
            llava_dir, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        # Scores differ between images by a few hundredths, so the small encoder (2.6 GB) stays in fp32.
        self.bertscore = BERTScore(bert_dir, bert_layer, self.device, torch.float32)
        self.answers, self.answers_lock = deque(maxlen=4096), threading.Lock()

    @torch.no_grad()
    def describe(self, images):
        """LLaVA's greedy answer to QUESTION for each uint8 (H, W, 3) image, as a list of strings."""
        # The reference sends each image to LLaVA as a JPEG of quality 80, so its artefacts are part of the reward.
        jpegs = []
        for img in np.asarray(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=80)
            jpegs.append(Image.open(buf).convert("RGB"))
        inputs = self.processor(images=jpegs, text=[LLAVA_PROMPT] * len(jpegs), padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.llava.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.processor.tokenizer.pad_token_id)
        answers = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [a.strip() for a in answers]

    def __call__(self, images, prompts):
        answers = self.describe(images)
        scores = self.bertscore.recall(answers, [f"The image contains {p}" for p in prompts])
        with self.answers_lock:  # called on AsyncReward's thread, read on the training loop's
            self.answers.extend(zip(prompts, answers, scores.tolist()))
        return scores

    def take_answers(self):
        """The (prompt, answer, score) of every image scored since the last call (the newest 4096 at most), so that
        train.py can log a few of what LLaVA saw each epoch (nanoddpo.rewards.write_answers)."""
        with self.answers_lock:
            answers = list(self.answers)
            self.answers.clear()
        return answers
