"""
Learned rewards for DDPO: the LAION aesthetic score and VLM prompt alignment (LLaVA's answer scored by BERTScore).

- aesthetic (the DDPO paper's aesthetic quality task): CLIP ViT-L/14 projected image embedding, L2-normalised, into
  the LAION "improved aesthetic predictor" (a linear MLP trained on SAC + LOGOS + AVA ratings; scores on a 1-10 scale).
- alignment (the DDPO paper's automated prompt alignment task): LLaVA-1.5 answers "Answer concisely: what is going on in
  this image?"; the reward is the BERTScore recall of that answer against "The image contains <prompt>", with the
  bert-score package's settings for microsoft/deberta-xlarge-mnli (hidden states after layer 40, no idf, no rescaling).

Every model loads from a local folder under weights/ (weights/README.md says how to fetch each); nothing is
downloaded at run time. Use them through nanoddpo.rewards.get_reward("aesthetic" | "alignment").
Tests: pytest tests/test_rewards.py
"""
import io
import threading
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer, CLIPModel, LlavaForConditionalGeneration

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"

# The one command that fetches each reward model into its folder (also listed in weights/README.md).
DOWNLOADS = {
    "clip-vit-large-patch14": "hf download openai/clip-vit-large-patch14 config.json model.safetensors "
                              "--local-dir weights/clip-vit-large-patch14",
    "aesthetic-predictor": "wget -P weights/aesthetic-predictor https://github.com/christophschuhmann/"
                           "improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
    "llava-1.5-7b-hf": "hf download llava-hf/llava-1.5-7b-hf --exclude '*.bin' --local-dir weights/llava-1.5-7b-hf",
    "deberta-xlarge-mnli": "hf download microsoft/deberta-xlarge-mnli --exclude '*.h5' --exclude '*.msgpack' "
                           "--local-dir weights/deberta-xlarge-mnli",
}


def require(path, name):
    """Fail early, naming the missing folder or file and the command that fetches it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reward model not found: {path}\nfetch it, from the repository root, with:\n"
                                f"    {DOWNLOADS[name]}\n(see weights/README.md)")
    return path


def default_device_dtype(device, dtype):
    """bf16 on CUDA, fp32 on CPU, unless the caller says otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Aesthetic score

# CLIPImageProcessor's numbers for openai/clip-vit-large-patch14 (preprocessor_config.json).
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size=CLIP_SIZE):
    """uint8 (B, H, W, 3) -> normalised float (B, 3, size, size), on the images' device, as CLIPImageProcessor does it.

    CLIPImageProcessor resizes the shortest edge to 224 with PIL's bicubic filter, centre-crops 224 x 224, scales to
    [0, 1] and normalises. PIL resizes the width first and then the height, rounding to uint8 after each pass;
    torch's antialiased bicubic uses PIL's kernel (a = -0.5), so the same two passes with the same rounding agree with
    it to within one grey level on a handful of pixels, even on noise (one pass in float differs by up to 20 levels).
    """
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = (size, int(w * scale)) if h <= w else (int(h * scale), size)
    x = F.interpolate(x, size=(h, new_w), mode="bicubic", antialias=True).round().clamp(0, 255)
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True).round().clamp(0, 255)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top:top + size, left:left + size]  # (B, 3, size, size)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
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
    aesthetic_score / AestheticScorer."""

    def __init__(self, clip_dir=WEIGHTS / "clip-vit-large-patch14",
                 mlp_path=WEIGHTS / "aesthetic-predictor" / "sac+logos+ava1-l14-linearMSE.pth",
                 device=None, dtype=None):
        self.device, self.dtype = default_device_dtype(device, dtype)
        clip_dir, mlp_path = require(clip_dir, "clip-vit-large-patch14"), require(mlp_path, "aesthetic-predictor")
        clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
        # Only the image tower and its projection are used; the text tower (123 M parameters) is dropped here.
        self.vision = clip.vision_model.to(self.device, self.dtype).eval()
        self.projection = clip.visual_projection.to(self.device, self.dtype).eval()
        self.mlp = AestheticMLP.load(mlp_path).to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, images, prompts=None):
        pixels = clip_preprocess(torch.as_tensor(images, device=self.device)).to(self.dtype)
        embed = self.projection(self.vision(pixel_values=pixels).pooler_output)  # (B, 768), CLIP's image_embeds
        embed = embed / embed.norm(dim=-1, keepdim=True)
        return self.mlp(embed).squeeze(1).float().cpu().numpy()


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
        cand, cand_mask, _ = self.embed(candidates)
        ref, _, ref_weight = self.embed(references)
        sim = ref @ cand.transpose(1, 2)  # (B, ref tokens, candidate tokens) cosine similarities
        sim = sim.masked_fill(~cand_mask[:, None, :], -torch.inf)  # padding is never a match
        best = sim.max(dim=2).values  # (B, ref tokens): each reference token's closest candidate token
        recall = (best * ref_weight).sum(1) / ref_weight.sum(1)
        empty = cand_mask.sum(1) <= 2  # only [CLS] [SEP]
        return recall.masked_fill(empty, 0.0).cpu().numpy().astype(np.float32)


class AlignmentReward:
    """reward(images, prompts) -> BERTScore recall of LLaVA's description against "The image contains <prompt>".
    Counterpart of ddpo-pytorch's llava_bertscore, which calls a separate LLaVA server; here both models are in-process.
    """

    def __init__(self, llava_dir=WEIGHTS / "llava-1.5-7b-hf", bert_dir=WEIGHTS / "deberta-xlarge-mnli", bert_layer=40,
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
