"""SD 1.5's architecture, executed: one gradient step of every registered reward method on SD 1.5's UNet, VAE and
CLIP text encoder built from their public configs, random weights, nothing downloaded (issue 20, item 1).

    python -m minialign.sd.sd15 --latent 8 --steps 3 --json sd15_cpu.json     # full width (about 1 B parameters)
    python -m minialign.sd.sd15 --width 32 --latent 8 --steps 3               # channels scaled down: the CI test

The configs are SD 1.5's published numbers: UNet2DConditionModel with block_out_channels (320, 640, 1280, 1280),
2 layers per block, three CrossAttnDownBlock2D and a DownBlock2D, 8 attention heads, cross_attention_dim 768
(859.5 M parameters; minialign.measure.sd_bench.sd15_parts builds it and the VAE); AutoencoderKL with
(128, 256, 512, 512) and scaling factor 0.18215 (83.7 M); CLIPTextModel with vocabulary 49408, hidden 768, 12 layers,
12 heads, MLP 3072, 77 positions, quick_gelu (123.1 M); DDIMScheduler with the scaled-linear betas
0.00085..0.012, steps_offset 1, set_alpha_to_one False (so the chains end at abar_0, final_timestep 0).
Deviation: the real CLIP tokenizer needs its vocabulary file (a download); the project's caption tokenizer
(sd.tiny.make_tokenizer, 77 positions) stands in. Its ids index the full 49408-row embedding, so the text encoder's
compute is SD 1.5's. `width` scales the UNet's and VAE's channels (sd15_parts) and keeps one text layer.

Each method of the registry except SFT-PG (which matches data, not a reward) goes through the SD front,
build_sd(name, pipe, brightness, prompts, guidance_scale, n_steps, batch): LoRA rank 4 on attention q/k/v/out, CFG
on, reward = brightness of the VAE-decoded image; then one loss_fn call, backward and an AdamW step on the LoRA.
Checked per method: the loss is finite, LoRA B matrices moved (B = 0 at the start, so they had a gradient; the count
is shown: T-LoRA trains its own per-segment adapters, not the shared one), every other UNet weight kept its checksum. Recorded: FLOPs of the step (torch's FlopCounterMode, forward and backward),
wall and process-CPU seconds, peak RSS during the step and its rise above what was resident before it.
ShortFT: the shortcut is the base UNet itself with the LoRA switched off for the jump (shared weights, no second
copy; distillation changes weights, not cost); anchors are the chain's first and last step, so one jump between.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from minialign.rewards.image import brightness

PROMPTS = ["a red digit seven", "a blue digit one"]
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def build(width=None, latent: int = 8, seed: int = 0):
    """A StableDiffusionPipeline of SD 1.5's architecture with random weights (see the module docstring), eval mode."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from minialign.measure.sd_bench import sd15_parts
    from minialign.sd.tiny import make_tokenizer

    if not isinstance(latent, int) or isinstance(latent, bool) or latent < 8 or latent % 8:
        raise ValueError(f"latent must be a multiple of 8 (the UNet halves it three times), got {latent!r}")
    torch.manual_seed(seed)
    parts = sd15_parts(width)
    parts.unet.register_to_config(sample_size=latent)
    tok = make_tokenizer(max_length=SD15_TEXT["max_position_embeddings"])
    text = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT, "num_hidden_layers": 12 if width is None else 1},
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=text, tokenizer=tok, unet=parts.unet,
                                   scheduler=parts.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


class LoRAOff(nn.Module):
    """The pipeline's UNet with its LoRA layers bypassed (peft's per-layer switch), as a denoiser with no parameters of
    its own: the frozen base, sharing the weights. Refused with UNet gradient checkpointing, whose backward would
    recompute the blocks with the LoRA switched back on (issue 19 item 4)."""

    def __init__(self, pipe, guidance_scale: float):
        super().__init__()
        from minialign.sd.adapter import SDDenoiser

        object.__setattr__(self, "den", SDDenoiser(pipe, guidance_scale))  # held, not registered: no parameters

    def forward(self, x, t, cond):
        from peft.tuners.tuners_utils import BaseTunerLayer

        unet = self.den.unet
        if getattr(unet, "gradient_checkpointing", False):
            raise ValueError("LoRAOff: the UNet has gradient checkpointing on; its backward would recompute with the LoRA")
        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m._disable_adapters = True
        try:
            return self.den(x, t, cond)
        finally:
            for m in layers:
                m._disable_adapters = False


def reward_methods() -> list[str]:
    """Every registered method that maximises a reward (all but those that need data)."""
    from minialign.methods import REGISTRY

    return [n for n, m in REGISTRY.items() if not m.needs_data]


def _checksum(unet) -> dict:
    return {n: (float(p.double().sum()), float(p.double().abs().sum())) for n, p in unet.named_parameters() if "lora_" not in n}


def one_step(pipe, name: str, *, n_steps: int = 3, batch: int = 2, guidance_scale: float = 7.5, lr: float = 1e-3,
             prompts=PROMPTS, seed: int = 0) -> dict:
    """One gradient step of method `name` on `pipe` (LoRA added here when missing); returns its row (see the docstring)."""
    from minialign.measure.memory import peak_rss_mb, reset_peak_rss, rss_mb
    from minialign.methods import REGISTRY
    from minialign.methods.chain import chain_timesteps
    from minialign.methods.shortcut import Shortcut
    from minialign.methods.shortft import jumps, layout
    from minialign.sd.adapter import add_lora, schedule_from
    from minialign.sd.build import build_sd, chain_of

    if not any("lora_" in n for n, _ in pipe.unet.named_parameters()):
        add_lora(pipe, rank=4, seed=seed)
    m, extra = REGISTRY[name], {}
    if m.extra is not None:  # ShortFT: first and last chain step trainable, one jump between
        schedule = schedule_from(pipe)
        ts = chain_timesteps(schedule, m.make_config(n_steps=n_steps, **chain_of(pipe)))
        if len(ts) < 3:
            raise ValueError(f"n_steps: ShortFT needs a chain of >= 3 steps for a shortcut jump, got {n_steps}")
        extra["anchors"] = (ts[0], ts[-1])
        segs = dict(jumps(layout(ts, extra["anchors"], schedule.T)))
        extra["shortcut"] = Shortcut(LoRAOff(pipe, guidance_scale), segs)
    if "k" in m.defaults and not m.defaults.get("random_k"):
        extra["k"] = min(m.defaults["k"], n_steps)
    den, loss_fn, cfg = build_sd(name, pipe, brightness(), prompts, guidance_scale=guidance_scale, n_steps=n_steps,
                                 batch=batch, **extra)
    den.train()
    lora = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    for p in lora.values():
        p.grad = None
    opt = torch.optim.AdamW(lora.values(), lr=lr)
    before_b = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
    before = _checksum(pipe.unet)
    resident = rss_mb()
    reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    with FlopCounterMode(display=False) as flops:
        loss, stats = loss_fn(den, 0, torch.Generator().manual_seed(seed))
        loss.backward()
    opt.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss_mb()
    after = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}  # a method may add adapters (T-LoRA)
    moved = sum(int(p.detach().abs().max() > 0 if n not in before_b else (p - before_b[n]).abs().max() > 0)
                for n, p in after.items())
    row = {"method": name, "label": m.label, "loss": float(loss), "loss_finite": bool(math.isfinite(float(loss))),
           "lora_moved": moved > 0, "lora_b_moved": f"{moved}/{len(after)}", "base_unchanged": _checksum(pipe.unet) == before, "gflops": flops.get_total_flops() / 1e9,
           "seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": peak, "step_rss_mb": peak - resident,
           "reward": float(stats.get("reward", float("nan")))}
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # back to B = 0, the base model: every method starts from the same place
        for p in after.values():
            p.zero_()
    return row


def run(width=None, latent: int = 8, n_steps: int = 3, batch: int = 2, guidance_scale: float = 7.5, methods=None,
        seed: int = 0, log=print) -> dict:
    """Build SD 1.5 (random weights) and take one step of each method; returns {"config", "rows"}."""
    names = list(methods) if methods is not None else reward_methods()
    bad = [n for n in names if n not in reward_methods()]
    if bad:
        raise ValueError(f"methods: {bad} are not registered reward methods; choose from {reward_methods()}")
    t0 = time.perf_counter()
    pipe = build(width, latent, seed)
    params = {p: sum(x.numel() for x in getattr(pipe, p).parameters()) for p in ("unet", "vae", "text_encoder")}
    config = dict(width=width, latent=latent, image=8 * latent, n_steps=n_steps, batch=batch, guidance_scale=guidance_scale,
                  seed=seed, parameters=params, build_seconds=time.perf_counter() - t0, threads=torch.get_num_threads(),
                  torch=torch.__version__)
    if log:
        log(f"SD 1.5 architecture ({'full width' if width is None else f'width {width}'}), random weights: "
            + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in params.items()) + f"; built in {config['build_seconds']:.0f} s")
    from minialign.methods import REGISTRY

    rows = []  # methods that add adapters to the model they train (T-LoRA) go last: theirs stay in the UNet
    for name in sorted(names, key=lambda n: getattr(REGISTRY[n], "prepare", None) is not None):
        rows.append(one_step(pipe, name, n_steps=n_steps, batch=batch, guidance_scale=guidance_scale, seed=seed))
        if log:
            log(format_row(rows[-1]))
    return {"config": config, "rows": rows}


HEADER = f"{'method':<28}{'loss ok':>8}{'B moved':>11}{'base kept':>10}{'GFLOP':>9}{'wall s':>8}{'CPU s':>8}{'peak MB':>9}{'step MB':>9}"


def format_row(r: dict) -> str:
    return (f"{r['label']:<28}{str(r['loss_finite']):>8}{r['lora_b_moved']:>11}{str(r['base_unchanged']):>10}"
            f"{r['gflops']:>9.0f}{r['seconds']:>8.1f}{r['cpu_seconds']:>8.1f}{r['peak_rss_mb']:>9.0f}{r['step_rss_mb']:>9.0f}")


def format_table(result: dict) -> str:
    c = result["config"]
    head = (f"one gradient step on SD 1.5's architecture ({'full width' if c['width'] is None else 'width ' + str(c['width'])}, "
            f"random weights), {c['latent']}x{c['latent']} latent ({c['image']}x{c['image']} image), {c['n_steps']} steps, "
            f"batch {c['batch']}, CFG {c['guidance_scale']}, LoRA rank 4, {c['threads']} thread(s)")
    return "\n".join([head, HEADER] + [format_row(r) for r in result["rows"]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=None, help="scale the UNet's and VAE's channels (multiple of 32)")
    p.add_argument("--latent", type=int, default=8, help="latent side (multiple of 8); the image is 8x larger")
    p.add_argument("--steps", type=int, default=3, help="DDIM steps of the chain (ShortFT needs >= 3)")
    p.add_argument("--batch", type=int, default=2, help="prompts per step (DDPO's advantage needs >= 2)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    result = run(a.width, a.latent, a.steps, a.batch, a.guidance, a.methods, log=print)
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    bad = [r["method"] for r in result["rows"] if not (r["loss_finite"] and r["lora_moved"] and r["base_unchanged"])]
    if bad:
        print(f"FAILED: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
