"""Registered methods on a StableDiffusionPipeline: the chain, conditioning and extras each needs, in one call.

    pipe = tiny_pipeline(); add_lora(pipe)
    den, loss_fn, cfg = build_sd("draft_1", pipe, brightness(), ["a red digit seven"], n_steps=10, batch=2)
    train(den, loss_fn, TrainConfig(steps=100, lr=1e-4))          # minialign.train: LoRA only (the rest is frozen)

What `build_sd` fills in for a method of the registry (minialign.methods):
- the chain: the scheduler's timestep spacing and steps_offset (leading + 1 for SD 1.x), so the training chain
  visits the timesteps the pipeline visits;
- the sampler's space: latents [4, h, w] (the UNet's sample size), the reward on decode(z) (`latent_reward`);
- cond: the prompts' packed embeddings [B, 2, L, D] (encode_prompt), cycled to the batch, row b for sample b;
- SFT-PG (needs_data): `data` = real LATENTS [M, 4, h, w] (`encode_images` of real images) and one prompt: its
  trajectory buffer mixes samples across critic steps, so the prompt is baked into the denoiser (`FixedPrompt`);
- ShortFT: a `shortcut` distilled from the pipeline itself by `distil_shortcut` (segment-wise regression onto
  the pipeline's own DDIM trajectory, as minialign.methods.shortcut does for the toys).

SD 1.x's last step: its DDIM scheduler has set_alpha_to_one=False, so `pipe(...)` ends at abar_0 = 1 - beta_0
(t = 0, `final_timestep_of(pipe)` = 0). `chain_of` puts that into the method's ChainConfig (final_timestep), so a
method scores the x_0 the pipeline returns (not the fully denoised x0_hat, sqrt(1 - abar_0) eps ~ 0.03 eps away).
The tiny pipeline and mini-SD set set_alpha_to_one=True (final_timestep -1), where both ends agree.

Mixed precision: `autocast_loss(loss_fn, torch.bfloat16)` runs the method's forward (sampling, decode, reward) under
torch.autocast; parameters and their gradients stay float32 (bf16 on CPU or GPU; fp16 on GPU needs a loss scale
that train() does not apply). UNet gradient checkpointing: `pipe.unet.enable_gradient_checkpointing()` (recompute
each UNet block in backward; diffusers turns it on only in train mode, which train() sets), independent of the
methods' own `checkpoint=True` (which recomputes each whole network call).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import nn

from minialign import methods
from minialign.methods.chain import chain_timesteps
from minialign.methods.shortft import ShortFTConfig, jumps, layout
from minialign.sampling import plan_none, sample
from minialign.sd.adapter import SDDenoiser, decode, encode_prompt, final_timestep_of, latent_reward, schedule_from, timesteps_from


def latent_shape(pipe) -> tuple:
    """One latent's shape [C, h, w] (the UNet's in_channels and sample_size)."""
    c = pipe.unet.config
    return (c.in_channels, c.sample_size, c.sample_size)


def chain_of(pipe) -> dict:
    """ChainConfig fields of the pipeline's scheduler: {"spacing", "offset", "final_timestep"}."""
    cfg = pipe.scheduler.config
    spacing = cfg.get("timestep_spacing", "leading")
    return {"spacing": spacing, "offset": int(cfg.get("steps_offset", 0)) if spacing == "leading" else 0,
            "final_timestep": final_timestep_of(pipe)}


def batch_cond(pipe, prompts: Sequence[str], batch: int) -> torch.Tensor:
    """Packed embeddings [batch, 2, L, D] of `prompts` cycled to `batch` rows (row b: prompts[b % P])."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return encode_prompt(pipe, [prompts[b % len(prompts)] for b in range(batch)])


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Latents [B, 4, h, w] = scaling_factor * mean of the VAE posterior of images [B, 3, H, W] in [-1, 1]."""
    vae = pipe.vae
    return vae.encode(images.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor


class FixedPrompt(nn.Module):
    """A denoiser that ignores its cond and uses one prompt's packed embeddings [1, 2, L, D] for every sample."""

    def __init__(self, denoiser: nn.Module, cond: torch.Tensor):
        super().__init__()
        if cond.dim() != 4 or cond.shape[0] != 1:
            raise ValueError(f"cond must be one prompt's packed embeddings [1, 2, L, D], got {tuple(cond.shape)}")
        self.denoiser = denoiser
        self.register_buffer("cond", cond, persistent=False)

    def forward(self, x, t, cond=None):
        return self.denoiser(x, t, self.cond.expand(x.shape[0], *self.cond.shape[1:]))


def build_sd(name: str, pipe, image_reward, prompts: Sequence[str], *, guidance_scale: float = 1.0,
             data: Optional[torch.Tensor] = None, shortcut=None, **overrides):
    """(denoiser, loss_fn, cfg) of registered method `name` on `pipe` (see the module docstring).

    image_reward: a reward on images [B, 3, H, W] (minialign.rewards.image / learned); it is applied to decode(z).
    overrides:    the method's config fields (n_steps, batch, eta, ...); spacing/offset default to the scheduler's.
    data:         SFT-PG's real latents [M, 4, h, w]; shortcut: ShortFT's (distil_shortcut).
    """
    m = methods.get(name)
    cfg = methods.make_config(name, **{**chain_of(pipe), **overrides})  # its defaults < its chain's needs < overrides
    schedule, shape = schedule_from(pipe), latent_shape(pipe)
    den = SDDenoiser(pipe, guidance_scale)
    extra, reward = {}, latent_reward(pipe, image_reward)
    if m.needs_data:
        if data is None:
            raise ValueError(f"data: {m.label} matches a data distribution; pass real latents [M, {shape}] (encode_images)")
        if len(prompts) != 1:
            raise ValueError(f"prompts: {m.label} on SD takes exactly one prompt (FixedPrompt), got {len(prompts)}")
        den, cond, extra, reward = FixedPrompt(den, encode_prompt(pipe, list(prompts))), None, {"data": data}, None
    else:
        cond = batch_cond(pipe, prompts, cfg.batch)
    context = {"pipe": pipe, "guidance_scale": guidance_scale, "shortcut": shortcut}  # the method's `extra` reads it
    loss_fn, cfg = methods.setup(name, schedule, reward, shape=shape, cond=cond, kind="sd", context=context, config=cfg,
                                 model=den, extra=extra)  # model: prepared in place (T-LoRA's adapters) if declared
    return den, loss_fn, cfg


def distil_shortcut(pipe, prompts: Sequence[str], cfg: Optional[ShortFTConfig] = None, *, guidance_scale: float = 1.0,
                    steps: int = 200, batch: int = 16, pool: int = 64, lr: float = 1e-4, seed: int = 0):
    """(Shortcut, meta): a copy of the pipeline's UNet fine-tuned so that ONE DDIM step from t_a lands where the
    pipeline's own DDIM chain (cfg's timesteps and final timestep, eta = 0, same guidance) lands at t_b, for each
    ShortFT jump (t_a, t_b), by the one distillation loop of the toy models (shortcut.distil_segments):

        L(phi) = E || eps_phi(x_a, t_a, c) - (x_b^teacher - a x_a) / b ||^2        (minialign.methods.shortcut, on latents)

    pool: teacher trajectories (x_T ~ N(0, I), prompts cycled); meta["fidelity"]: per jump, rms of the shortcut's
    jump and of the base's own one step against the teacher's endpoint, on `pool` held-out trajectories.
    """
    from minialign.methods.shortcut import distil_segments

    cfg = cfg or ShortFTConfig(**chain_of(pipe))
    for k, v in (("steps", steps), ("batch", batch), ("pool", pool)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    schedule, shape = schedule_from(pipe), latent_shape(pipe)
    grid = chain_timesteps(schedule, cfg)
    segs = jumps(layout(grid, cfg.anchors, schedule.T, cfg.final_timestep))
    if not segs:
        raise ValueError(f"cfg: the chain {grid} with anchors {cfg.anchors} has no shortcut jump (every piece is a base "
                         "step); use more n_steps")
    dtype = next(pipe.unet.parameters()).dtype

    def draw(n, g):
        return torch.randn((n, *shape), generator=g, dtype=dtype), batch_cond(pipe, prompts, n)

    student = SDDenoiser(SimpleNamespace(unet=copy.deepcopy(pipe.unet)), guidance_scale)
    shortcut, losses, fid, _ = distil_segments(
        student, SDDenoiser(pipe, guidance_scale), schedule, [(a, b, "sd") for a, b in segs], {"sd": grid}, draw,
        steps=steps, batch=batch, pool=pool, lr=lr, generator=torch.Generator().manual_seed(seed), chunk=batch,
        final_timestep=cfg.final_timestep)
    shortcut.meta = {"segments": [list(s) for s in segs], "grid": grid, "steps": steps, "batch": batch, "pool": pool,
                     "lr": lr, "seed": seed, "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                     "fidelity": fid}
    return shortcut, shortcut.meta


def autocast_loss(loss_fn, dtype: torch.dtype = torch.bfloat16, device_type: Optional[str] = None):
    """loss_fn whose forward runs under torch.autocast(device_type, dtype) (default: the model's device); the loss is
    returned in float32. Keeps the wrapped loss_fn's `optimizer` / `state_dict` / `load_state_dict` (SFT-PG)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype!r}")
    return _Autocast(loss_fn, dtype, device_type)


class _Autocast:
    def __init__(self, loss_fn, dtype, device_type):
        self.loss_fn, self.dtype, self.device_type = loss_fn, dtype, device_type

    def __call__(self, model, step, generator):
        dev = self.device_type or next(model.parameters()).device.type
        with torch.autocast(dev, dtype=self.dtype):
            loss, stats = self.loss_fn(model, step, generator)
        return loss.float(), stats

    def __getattr__(self, name):  # optimizer, state_dict, load_state_dict of a method with its own networks
        return getattr(self.loss_fn, name)


@torch.no_grad()
def sample_latents(pipe, prompts: Sequence[str], x_T: torch.Tensor, n_steps: int, guidance_scale: float = 1.0,
                   eta: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Inference: the pipeline's own chain (its timesteps, its final timestep) from x_T, with the current LoRA."""
    ts = timesteps_from(pipe, n_steps)
    return sample(SDDenoiser(pipe, guidance_scale), schedule_from(pipe), x_T, ts, eta, plan_none(len(ts)),
                  cond=batch_cond(pipe, prompts, x_T.shape[0]), generator=generator,
                  final_timestep=final_timestep_of(pipe))[0]


@torch.no_grad()
def sample_images(pipe, prompts, x_T, n_steps: int, guidance_scale: float = 1.0, **kw) -> torch.Tensor:
    """decode(sample_latents(...)): images [B, 3, H, W] in [-1, 1] (unclamped)."""
    return decode(pipe, sample_latents(pipe, prompts, x_T, n_steps, guidance_scale, **kw))
