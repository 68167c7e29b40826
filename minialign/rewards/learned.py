"""Learned image rewards (optional, loaded lazily): LAION aesthetic, PickScore, ImageReward, HPSv2.

Each takes SD images [B, 3, H, W] in [-1, 1] (decode's output) and is differentiable through a preprocessing
written in torch (no PIL round trip), so pathwise methods can backpropagate into the image:

    clip_preprocess:  p = (x + 1) / 2, resize the shorter side to 224 (bicubic), centre-crop 224 x 224,
                      (p - mean_CLIP) / std_CLIP per channel
    aesthetic:        e = CLIP ViT-L/14 image embedding (CLIPVisionModelWithProjection), e / |e|,
                      r = MLP(e): 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (LAION's improved aesthetic predictor; linear
                      layers with dropout between and no activation, as its released head)
    pickscore:        r = exp(logit_scale) * cos(image embedding, prompt embedding)   (CLIP-H fine-tuned: PickScore_v1)
    image_reward:     BLIP image-text model + MLP, (raw - 0.1672) / 1.0333 (ImageReward-v1.0's `score_gard`)
    hpsv2:            open_clip ViT-H-14 fine-tuned on HPD v2: r = cos(image embedding, prompt embedding)

Weights are never downloaded at run time: a hub id is looked up in the local Hugging Face cache only
(local_files_only=True), a path is read from disk, and a missing one fails within seconds with an OSError naming
how to get it. ImageReward and HPSv2 need packages that pull in torchvision, which breaks this project's CPU torch:
they are an extra that the default setup never installs (`pip install minialign[hps]` in a separate environment),
and without it they raise an ImportError that says so.

Deviation from the scorers' own pipelines: they resize PIL images of uint8 pixels (PIL bicubic, then rounding);
here the float image is resized by torch's bicubic interpolation without rounding (differentiable; values differ
by the interpolation kernels' difference, see tests/test_sd_rewards.py).

Prompts: `text` is one string for the whole batch, a list [B], or a callable cond -> list[str] (on SD the
conditioning is the prompt embeddings: minialign.rewards.image.prompt_lookup(pipe, prompts, prompts) maps them back).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from minialign.rewards import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_HEAD_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
HOW_TO_GET = "get it once with network access: `huggingface-cli download {id} --local-dir <dir>`, then pass <dir>"
NEEDS_TORCHVISION = ("{what} needs the `{pkg}` package, which pulls in torchvision and breaks this project's CPU torch: "
                     "it is the optional extra `hps`, never installed by the default setup. In a separate environment "
                     "with a torch/torchvision pair that match: `pip install -e .[hps]` (or `pip install {pkg}`).")
Text = Union[str, Sequence[str], Callable]


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> CLIP's input [B, 3, size, size] (see the module docstring), with graph."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be RGB [B, 3, H, W] in [-1, 1], got {getattr(images, 'shape', type(images))}")
    p = (images + 1) / 2
    h, w = p.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        p = F.interpolate(p, size=(nh, nw), mode="bicubic", align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        p = p[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=p.dtype, device=p.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=p.dtype, device=p.device).view(1, 3, 1, 1)
    return (p - m) / s


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _texts(text: Text, cond, batch: int) -> list:
    t = text(cond) if callable(text) else text
    t = [t] * batch if isinstance(t, str) else list(t)
    if len(t) != batch or not all(isinstance(s, str) for s in t):
        raise ValueError(f"text must give one string per image ({batch}), got {t!r}")
    return t


def _check_text(text):
    if not (isinstance(text, str) or callable(text) or (isinstance(text, (list, tuple)) and text)):
        raise ValueError(f"text must be a prompt, a list of prompts or a callable cond -> prompts, got {text!r}")


def _from_pretrained(cls, src: str, download: bool = False, **kw):
    """cls.from_pretrained from a directory or the local cache only; a clear OSError when absent."""
    if not isinstance(src, (str, os.PathLike)) or not str(src):
        raise ValueError(f"model source must be a hub id or a directory, got {src!r}")
    try:
        return cls.from_pretrained(str(src), local_files_only=not download, **kw)
    except (OSError, ValueError) as e:
        raise OSError(f"{cls.__name__}: {str(src)!r} is neither a directory holding the weights nor in the local "
                      f"Hugging Face cache ({type(e).__name__}). {HOW_TO_GET.format(id=src)}") from e


def _tokenizer(src: str, download: bool = False):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, src, download)
    if len(tok) <= 2:  # HF_HUB_OFFLINE may hand back a degenerate tokenizer without raising
        raise OSError(f"the tokenizer of {src!r} has {len(tok)} tokens (not in the local cache). {HOW_TO_GET.format(id=src)}")
    return tok


class AestheticHead(nn.Module):
    """LAION's improved aesthetic predictor head (state-dict keys layers.0/2/4/6/7 as in its released .pth)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, e):
        return self.layers(e)


def load_aesthetic_head(path, dim: int = 768) -> AestheticHead:
    """The head from a local .pth (torch state dict) or .safetensors file."""
    if not os.path.isfile(str(path)):
        raise OSError(f"aesthetic head: no file {str(path)!r}. Get LAION's head once with network access: "
                      f"`wget {AESTHETIC_HEAD_URL}`, then pass its path")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    head = AestheticHead(dim)
    head.load_state_dict(state)
    return head


def _frozen(*modules):
    for m in modules:
        m.eval().requires_grad_(False)


def aesthetic(clip: str = "openai/clip-vit-large-patch14", head="sac+logos+ava1-l14-linearMSE.pth", *,
              vision_model=None, head_module=None, download: bool = False) -> Reward:
    """LAION aesthetic score (about 1..10) of each image; differentiable. Give `clip` (hub id or directory) and `head`
    (a local file), or already built modules (vision_model: a CLIPVisionModelWithProjection; head_module)."""
    from transformers import CLIPVisionModelWithProjection

    vision = vision_model or _from_pretrained(CLIPVisionModelWithProjection, clip, download)
    mlp = head_module or load_aesthetic_head(head, vision.config.projection_dim)
    _frozen(vision, mlp)
    size = vision.config.image_size

    def fn(x, cond=None):
        pixels = clip_preprocess(x, size).to(next(vision.parameters()).dtype)
        e = vision(pixel_values=pixels).image_embeds
        return mlp(e / e.norm(dim=-1, keepdim=True)).squeeze(-1).to(x.dtype)

    return Reward(fn, "LAION aesthetic", differentiable=True)


def pickscore(text: Text, model: str = "yuvalkirstain/PickScore_v1",
              processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", *, clip_model=None, tokenizer=None,
              download: bool = False) -> Reward:
    """PickScore: exp(logit_scale) * cos(image, prompt) of the PickScore CLIP model (tokenizer: the processor's)."""
    from transformers import CLIPModel

    _check_text(text)
    net = clip_model or _from_pretrained(CLIPModel, model, download)
    tok = tokenizer or _tokenizer(processor, download)
    _frozen(net)
    size = net.config.vision_config.image_size

    def fn(x, cond=None):
        dev = next(net.parameters()).device
        ids = tok(_texts(text, cond, x.shape[0]), padding=True, truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").to(dev)
        img = _features(net.get_image_features(pixel_values=clip_preprocess(x, size).to(net.dtype)))
        txt = _features(net.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]))
        cos = F.cosine_similarity(img, txt, dim=-1)
        return (net.logit_scale.exp() * cos).to(x.dtype)

    return Reward(fn, "PickScore", differentiable=True)


def image_reward(text: Text, checkpoint: str = "ImageReward-v1.0", med_config=None, *, device="cpu") -> Reward:
    """ImageReward (Xu et al. 2023) through its own package's `score_gard` (the differentiable path ReFL uses).
    checkpoint: "ImageReward-v1.0" (the package's cache) or a local ImageReward.pt; med_config: its med_config.json."""
    _check_text(text)
    try:
        import ImageReward as RM
    except ImportError as e:
        raise ImportError(NEEDS_TORCHVISION.format(what="ImageReward", pkg="image-reward")) from e
    try:
        net = RM.load(checkpoint, device=device, med_config=med_config)
    except Exception as e:  # the package downloads on a miss; offline that is a network error, not a clear one
        raise OSError(f"ImageReward: could not load {checkpoint!r} ({type(e).__name__}). Get ImageReward.pt and "
                      "med_config.json once from the hub repo THUDM/ImageReward and pass their paths") from e
    _frozen(net)

    def fn(x, cond=None):
        ids = net.blip.tokenizer(_texts(text, cond, x.shape[0]), padding="max_length", truncation=True, max_length=35,
                                 return_tensors="pt").to(device)
        return net.score_gard(ids.input_ids, ids.attention_mask, clip_preprocess(x, 224)).squeeze(-1).to(x.dtype)

    return Reward(fn, "ImageReward", differentiable=True)


def hpsv2(text: Text, checkpoint: str = "HPS_v2.1_compressed.pt", *, device="cpu") -> Reward:
    """HPSv2 (Wu et al. 2023): open_clip ViT-H-14 with the HPS v2(.1) weights from a local checkpoint file
    (hub repo xswu/HPSv2); r = cos(image, prompt) of the normalised features."""
    _check_text(text)
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(NEEDS_TORCHVISION.format(what="HPSv2", pkg="open_clip_torch")) from e
    if not os.path.isfile(str(checkpoint)):
        raise OSError(f"HPSv2: no checkpoint file {str(checkpoint)!r}. {HOW_TO_GET.format(id='xswu/HPSv2')}")
    net = open_clip.create_model("ViT-H-14", pretrained=None, device=device)
    state = torch.load(str(checkpoint), map_location=device, weights_only=True)
    net.load_state_dict(state.get("state_dict", state))
    tok = open_clip.get_tokenizer("ViT-H-14")
    _frozen(net)

    def fn(x, cond=None):
        img = F.normalize(net.encode_image(clip_preprocess(x, 224)), dim=-1)
        txt = F.normalize(net.encode_text(tok(_texts(text, cond, x.shape[0])).to(device)), dim=-1)
        return (img * txt).sum(-1).to(x.dtype)

    return Reward(fn, "HPSv2", differentiable=True)


# The scorers' published architectures (their weights are downloads; these build them with random weights for cost
# and gradient checks): CLIP ViT-L/14 for LAION aesthetic, CLIP ViT-H/14 (open_clip's laion2B, as HF CLIPModel) for
# PickScore_v1.
VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
CLIP_H14 = dict(vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                   image_size=224, patch_size=14, hidden_act="gelu"),
                text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
                projection_dim=1024)


def random_full_size(name: str, text: Text = "a photo", seed: int = 0) -> Reward:
    """`name` ("aesthetic" or "pickscore") at its real architecture with random weights (nothing is loaded); the
    tokenizer for PickScore is the project's caption tokenizer (sd.tiny.make_tokenizer, 77 positions)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    if name == "aesthetic":
        return aesthetic(vision_model=CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L14_VISION)),
                         head_module=AestheticHead(VIT_L14_VISION["projection_dim"]))
    if name == "pickscore":
        from minialign.sd.tiny import make_tokenizer

        tok = make_tokenizer(max_length=77)
        cfg = CLIPConfig(text_config={**CLIP_H14["text_config"], "bos_token_id": tok.bos_token_id,
                                      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
                         vision_config=CLIP_H14["vision_config"], projection_dim=CLIP_H14["projection_dim"])
        return pickscore(text, clip_model=CLIPModel(cfg), tokenizer=tok)
    raise ValueError(f"name must be 'aesthetic' or 'pickscore', got {name!r}")
