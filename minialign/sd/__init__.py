"""Stable Diffusion through diffusers: a pipeline as the shared sampler's denoiser (issue 12).

    pipe = tiny_pipeline()                       # or load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5" | dir)
    denoiser = SDDenoiser(pipe, guidance_scale)  # eps(x_t, t, cond) with classifier-free guidance
    cond = encode_prompt(pipe, prompts)          # [B, 2, L, D]: unconditional and conditional embeddings
    schedule = schedule_from(pipe)               # the scheduler's betas; latents are the sampler's space
    images = decode(pipe, latents)               # differentiable VAE decode, [-1, 1]

diffusers and transformers import lazily (inside the functions that need them).
"""
from minialign.sd.adapter import (LORA_TARGETS, SDDenoiser, add_lora, decode, encode_prompt, final_timestep_of, latent_reward, load_pipeline,
                      save_lora, schedule_from, timesteps_from)
from minialign.sd.tiny import make_tokenizer, tiny_pipeline
from minialign.rewards import image as rewards  # noqa: E402  weight-free image rewards; the learned ones are minialign.rewards.learned (lazy)
from minialign.sd.build import autocast_loss, build_sd, distil_shortcut, encode_images, sample_images, sample_latents

__all__ = ["LORA_TARGETS", "SDDenoiser", "add_lora", "decode", "encode_prompt", "final_timestep_of", "latent_reward", "load_pipeline",
           "make_tokenizer", "save_lora", "schedule_from", "tiny_pipeline", "timesteps_from",
           "rewards", "autocast_loss", "build_sd", "distil_shortcut", "encode_images", "sample_images", "sample_latents"]
