"""A diffusers `StableDiffusionPipeline` as the shared sampler's denoiser (DESIGN 5, issue 12).

The sampler's space is the pipeline's latent space: x_T ~ N(0, I) of shape [4, h, w], eps from the UNet,
the DDIM step of minialign.schedule with the pipeline scheduler's betas. Conditioning is the prompt
embeddings packed per sample as one tensor [B, 2, L, D] (row 0 unconditional, row 1 conditional), so that
the methods' `cond[:B]` slicing, repeats and minibatches keep each sample with its own prompt.
Classifier-free guidance (Ho & Salimans 2022), in one batched UNet call of 2B as the pipeline does:

    eps = eps_theta(x_t, t, c_u) + w (eps_theta(x_t, t, c) - eps_theta(x_t, t, c_u))      (w = 1: eps_theta(x_t, t, c))

Images: x = D(z / scaling_factor) in [-1, 1] (differentiable VAE decode). The pipeline's own output is
(x + 1) / 2 clamped to [0, 1]; `decode` leaves the clamp to the reward.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from minialign.schedule import SPACINGS, Schedule, timesteps


def encode_prompt(pipe, prompts, negative_prompt=None) -> torch.Tensor:
    """Prompt embeddings [B, 2, L, D]: [:, 0] of the negative prompt ("" by default), [:, 1] of the prompt.

    Uses the pipeline's own `encode_prompt` (same tokenizer padding and text encoder as `pipe(...)`), without graph.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(prompts), pipe.unet.device, 1, True, negative_prompt=negative_prompt)
    return torch.stack([uncond, cond], dim=1)


class SDDenoiser(nn.Module):
    """eps = denoiser(x_t [B, 4, h, w], t [B], cond [B, 2, L, D] or [B, L, D]) with classifier-free guidance.

    guidance_scale: w above (w = 1: the conditional UNet call only, as `pipe(...)` does for w <= 1).
    cond_at:        optional per-step conditioning, cond_at(t: int, cond) -> cond, called at every step
                    (e.g. RLR's step-range prompts: a different prompt for a range of timesteps). A call whose rows
                    hold several timesteps (RLR's batched likelihood-ratio terms) is split by timestep: each group
                    of rows gets the hook's conditioning for its own t (rows of cond_at(t, cond)), so the result
                    equals the separate calls.
    Its parameters are the UNet's (with any LoRA adapters): what the methods and the optimiser see.
    """

    def __init__(self, pipe, guidance_scale: float = 1.0, cond_at: Optional[Callable] = None):
        super().__init__()
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if cond_at is not None and not callable(cond_at):
            raise ValueError(f"cond_at must be None or a callable (t, cond) -> cond, got {type(cond_at)}")
        self.unet = pipe.unet
        self.guidance_scale = float(guidance_scale)
        self.cond_at = cond_at

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if self.cond_at is None:
            return self._eps(x, t, cond)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        values = t.unique()
        if len(values) == 1:
            return self._eps(x, t, self.cond_at(int(values[0]), cond))
        rows = [(t == v).nonzero().squeeze(1) for v in values]  # one network call per timestep, its own conditioning
        parts = [self._eps(x[r], t[r], self._rows(self.cond_at(int(v), cond), r, x.shape[0])) for v, r in zip(values, rows)]
        return torch.cat(parts)[torch.cat(rows).argsort()]

    @staticmethod
    def _rows(cond, rows, batch):
        if not isinstance(cond, torch.Tensor) or cond.shape[0] != batch:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond)
            raise ValueError(f"cond_at must return conditioning with the call's {batch} rows, got {got}")
        return cond[rows]

    def _eps(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or cond.dim() not in (3, 4) or cond.shape[0] != x.shape[0]:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond)
            raise ValueError(f"cond must be prompt embeddings [B={x.shape[0]}, 2, L, D] (encode_prompt) or [B, L, D], got {got}")
        cond = cond.to(x.dtype)
        if cond.dim() == 3 or self.guidance_scale <= 1:
            text = cond if cond.dim() == 3 else cond[:, 1]
            if self.guidance_scale != 1 and cond.dim() == 3:
                raise ValueError(f"guidance_scale={self.guidance_scale} needs unconditional embeddings: pass cond [B, 2, L, D]")
            return self.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
        emb = torch.cat([cond[:, 0], cond[:, 1]])
        eps_u, eps_c = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=emb, return_dict=False)[0].chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)


class LoRADenoiser(SDDenoiser):
    """An SDDenoiser whose trainable parameters are its UNet's LoRA adapter only: requires_grad_(flag) sets the
    adapter's parameters (names with "lora_") and leaves the base weights frozen, so code that trains "the model"
    (the arena: copy.deepcopy(base).requires_grad_(True)) trains the LoRA, as on Stable Diffusion one does."""

    def __init__(self, pipe, guidance_scale: float = 1.0, cond_at: Optional[Callable] = None):
        super().__init__(pipe, guidance_scale, cond_at)
        if not any("lora_" in n for n, _ in self.unet.named_parameters()):
            raise ValueError("the pipeline's UNet has no LoRA adapter (add_lora first)")

    def requires_grad_(self, requires_grad: bool = True):
        for n, p in self.named_parameters():
            p.requires_grad_(requires_grad and "lora_" in n)
        return self


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] (not clamped) = VAE decode of latents / scaling_factor, with graph."""
    vae = pipe.vae
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def latent_reward(pipe, image_reward, name: Optional[str] = None):
    """A reward on latents: r(z, cond) = image_reward(decode(z), cond); differentiable when image_reward is."""
    from minialign.rewards import Reward

    return Reward(lambda z, c: image_reward(decode(pipe, z), c), name or f"{getattr(image_reward, 'name', 'reward')} (decoded)",
                  getattr(image_reward, "differentiable", True))


def schedule_from(pipe) -> Schedule:
    """The forward process of the pipeline's scheduler: its betas (float32 in diffusers) as float64."""
    cfg = pipe.scheduler.config
    return Schedule(cfg.beta_schedule, pipe.scheduler.betas.detach().double().cpu().clone(), cfg.beta_start, cfg.beta_end)


def timesteps_from(pipe, n_steps: int) -> list[int]:
    """The n timesteps the pipeline's scheduler visits: its `timestep_spacing` and `steps_offset`."""
    cfg = pipe.scheduler.config
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise ValueError(f"the scheduler's timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return timesteps(cfg.num_train_timesteps, n_steps, spacing, cfg.get("steps_offset", 0) if spacing == "leading" else 0)


def final_timestep_of(pipe) -> int:
    """Where the DDIM scheduler's last step lands: -1 (abar = 1) with set_alpha_to_one, else 0 (abar_0, SD 1.x)."""
    return -1 if pipe.scheduler.config.get("set_alpha_to_one", True) else 0


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention q/k/v/out; add "ff.net.0.proj", "ff.net.2" for feed-forward


def add_lora(pipe, rank: int = 4, alpha: Optional[float] = None, targets=LORA_TARGETS, seed: int = 0):
    """Freeze the UNet and add a peft LoRA adapter W + (alpha / rank) B A on `targets`; returns its parameters.

    Through the project's one injector (minialign.lora.add_lora, seeded by `seed`) with peft's "gaussian" init:
    A ~ N(0, 1/rank), B = 0, so the pipeline's output is unchanged until training. The UNet is then marked as
    holding a peft config (diffusers' PeftAdapterMixin flag), so `save_lora` / `pipe.load_lora_weights` and the
    UNet's adapter switches work as after diffusers' own `unet.add_adapter`.
    """
    from minialign.lora import add_lora as inject

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    params = inject(pipe.unet, r=rank, target_modules=list(targets), alpha=alpha, seed=seed, init="gaussian")
    pipe.unet._hf_peft_config_loaded = True
    return params


def save_lora(pipe, directory) -> None:
    """Write the UNet's LoRA weights as diffusers' training scripts do (pytorch_lora_weights.safetensors), which a
    stock diffusers install reads with `pipe.load_lora_weights(directory)`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not getattr(pipe.unet, "peft_config", None):
        raise ValueError("the pipeline's UNet has no LoRA adapter to save (add_lora first)")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=layers)


HOW_TO_GET = ("Get the weights once with network access, e.g. `huggingface-cli download {id} --local-dir <dir>` "
              "(or load_pipeline({id!r}, download=True)), then pass that directory; or use the offline mini-SD / "
              "minialign.sd.tiny_pipeline()")


def load_pipeline(model_id_or_dir: str, download: bool = False, torch_dtype=None):
    """A StableDiffusionPipeline (SD 1.x or any save_pretrained directory) with a DDIM scheduler, no safety checker.

    A directory loads from disk. A hub id loads only from the local cache unless download=True, so a missing
    model fails within seconds (never waits on hub retries) with an OSError saying how to get the weights.
    The pipeline's scheduler is replaced by DDIMScheduler.from_config (SD 1.x ships PNDM), keeping its betas.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if not isinstance(model_id_or_dir, (str, os.PathLike)) or not str(model_id_or_dir):
        raise ValueError(f"model_id_or_dir must be a hub id or a directory, got {model_id_or_dir!r}")
    src = str(model_id_or_dir)
    local = os.path.isdir(src)
    if not local and (src.startswith((".", "/", "~")) or src.count("/") > 1):  # a path, not an owner/name id
        raise OSError(f"model_id_or_dir={src!r}: no such directory. " + HOW_TO_GET.format(id="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    offline = not download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=local or offline, torch_dtype=torch_dtype)
    except (OSError, ValueError) as e:
        where = f"the directory {src!r} holds no loadable pipeline" if local else f"{src!r} is not in the local Hugging Face cache"
        raise OSError(f"load_pipeline: {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                      + HOW_TO_GET.format(id=src if not local else "stable-diffusion-v1-5/stable-diffusion-v1-5")) from e
    if len(pipe.tokenizer) <= 2:
        raise OSError(f"load_pipeline: the tokenizer of {src!r} has {len(pipe.tokenizer)} tokens (a degenerate offline load). "
                      + HOW_TO_GET.format(id=src))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
