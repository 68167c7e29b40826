"""Cost of one gradient step of the registered methods on a Stable Diffusion UNet with LoRA (issue 12, part 6).

    python -m minialign.measure.sd_bench --model sd15 --device cuda --json sd15.json        # SD 1.5-size, config only (GPU)
    python -m minialign.measure.sd_bench --model tiny --steps 20 --batch 2 --rounds 5        # the random tiny pipeline (CPU)
    python -m minialign.measure.sd_bench --model mini --steps 20 --batch 2                   # mini-SD (data/mini_sd)

sd15: UNet2DConditionModel and AutoencoderKL built from SD 1.5's configs with random weights (the same compute as
the real model: cost does not depend on the weights; nothing is downloaded), 64x64 latents (512x512 images), a DDIM
chain of `steps` (default 50) with SD's leading spacing and steps_offset 1, batch 1, random prompt embeddings
[1, 2, 77, 768], LoRA rank 4 on attention q/k/v/out. `--width 32` scales the channels down (a CPU smoke run).

One gradient step = one call of the method's loss_fn (minialign.methods registry, defaults as there: RLR h = 2) and
backward, with the reward = mean brightness of the VAE-decoded image (the decode's cost and memory are part of every
method's step). `nograd` = one sampling chain without graph. ShortFT's shortcut is an undistilled frozen copy of the
UNet holding the jumps its layout needs (distillation changes its weights, not its cost). Timing and ratios as
minialign.measure.bench: interleaved rounds, median of per-round ratios against `nograd` and against checkpointed full
backprop (`full_bp_ckpt`; plain full backprop of a 50-step SD chain does not fit in GPU memory). Memory: bytes saved
for backward (total and live peak, minialign.measure.memory) and, on CUDA, torch.cuda.max_memory_allocated over two steps
minus the memory held before them (weights, optimiser-free).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from minialign import methods as registry
from minialign.measure.bench import interleaved_times
from minialign.measure.memory import peak_saved_bytes, saved_bytes
from minialign.methods.chain import ChainConfig, chain_timesteps
from minialign.sampling import plan_none, sample
from minialign.sd.adapter import SDDenoiser, add_lora, latent_reward, schedule_from
from minialign.rewards.image import brightness
from minialign.sd.build import chain_of, latent_shape

MODELS = ("tiny", "mini", "sd15")
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # with diffusers' defaults: SD 1.x's UNet (860M parameters)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
                scaling_factor=0.18215)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def sd15_parts(width=None, vae: bool = True):
    """SimpleNamespace(unet, vae, scheduler) of SD 1.5's architecture, random weights (on the current default device:
    build under `with torch.device("meta")` to count parameters without memory). width: scale the channels to
    (w, 2w, 4w, 4w) (a multiple of 32), attention and latent sizes unchanged."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet_kw, vae_kw = dict(SD15_UNET), dict(SD15_VAE)
    if width is not None:
        if not isinstance(width, int) or width < 32 or width % 32:
            raise ValueError(f"width must be a multiple of 32 (GroupNorm's 32 groups), got {width!r}")
        unet_kw["block_out_channels"] = (width, 2 * width, 4 * width, 4 * width)
        vae_kw["block_out_channels"] = (width, width, 2 * width, 2 * width)
    return SimpleNamespace(unet=UNet2DConditionModel(**unet_kw), vae=AutoencoderKL(**vae_kw) if vae else None,
                           scheduler=DDIMScheduler(**SD15_SCHEDULER))


def setup(model: str, device: str = "cpu", width=None, seed: int = 0):
    """(pipe-like with unet/vae/scheduler, cond(batch, generator) -> embeddings [batch, 2, L, D], note)."""
    torch.manual_seed(seed)
    if model == "sd15":
        pipe = sd15_parts(width)
        emb = torch.randn(1, 2, 77, 768)
        note = "SD 1.5 configs, random weights" + (f", width {width}" if width else "")
    elif model in ("tiny", "mini"):
        from minialign.sd.adapter import encode_prompt, load_pipeline
        from minialign.sd.tiny import tiny_pipeline

        if model == "tiny":
            pipe, note = tiny_pipeline(seed), "random tiny pipeline"
        else:
            from pathlib import Path

            path = Path(__file__).resolve().parents[2] / "data" / "mini_sd"
            pipe, note = load_pipeline(str(path)), f"mini-SD ({path.name})"
        emb = encode_prompt(pipe, ["a red digit seven"])
    else:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    for part in (pipe.unet, pipe.vae):
        part.to(device).eval().requires_grad_(False)
    emb = emb.to(device)
    return pipe, (lambda b, g: emb.expand(b, *emb.shape[1:])), note


def make_steps(pipe, cond, names, n_steps: int, batch: int, guidance_scale: float, device: str, autocast=None):
    """(denoiser, {name: (step(seed) -> loss after backward, forward(seed) -> loss with graph or None)}); adds LoRA."""
    from minialign.sd.build import autocast_loss

    schedule, shape = schedule_from(pipe), latent_shape(pipe)
    reward = latent_reward(pipe, brightness())
    extras = any(registry.get(n).extra is not None for n in names if n != "nograd")
    frozen = copy.deepcopy(pipe.unet) if extras else None  # before LoRA: a frozen copy of the base for an extra
    add_lora(pipe)
    den = SDDenoiser(pipe, guidance_scale).train()
    context = {"pipe": pipe, "guidance_scale": guidance_scale, "shortcut": None,
               "frozen": None if frozen is None else SDDenoiser(SimpleNamespace(unet=frozen), guidance_scale)}
    out = {}
    for name in names:
        if name == "nograd":
            ts = chain_timesteps(schedule, ChainConfig(n_steps=n_steps, **chain_of(pipe)))

            def nograd(seed):
                g = torch.Generator().manual_seed(seed)
                x_T = torch.randn((batch, *shape), generator=g).to(device)
                with torch.no_grad():
                    return sample(den, schedule, x_T, ts, plan=plan_none(n_steps), cond=cond(batch, g))[0]

            out[name] = (nograd, None)
            continue
        own = den  # a method that prepares its model (T-LoRA's adapters) gets its own copy of the LoRA UNet
        if registry.get(name).prepare is not None:
            own = SDDenoiser(SimpleNamespace(unet=copy.deepcopy(pipe.unet)), guidance_scale).train()
        loss_fn, _ = registry.setup(name, schedule, reward, shape=shape, cond=cond, kind="sd", context=context,
                                    model=own, **chain_of(pipe), n_steps=n_steps, batch=batch)
        if autocast is not None:
            loss_fn = autocast_loss(loss_fn, autocast)
        out[name] = _method_step(loss_fn, own, device)
    return den, out


def _method_step(loss_fn, den, device):
    def forward(seed):
        return loss_fn(den, 0, torch.Generator().manual_seed(seed))[0]

    def step(seed):
        loss = forward(seed)
        loss.backward()
        den.zero_grad(set_to_none=True)
        return loss

    forward.params = list(den.parameters())  # the model's own tensors, left out of the saved bytes
    return step, forward


def run(model: str = "tiny", n_steps: int = 50, batch: int = 1, methods=None, rounds: int = 3, device: str = "cpu",
        guidance_scale: float = 1.0, autocast=None, unet_checkpointing: bool = False, width=None,
        clock: str = "wall") -> dict:
    """Every method side by side (see the module docstring); returns {"config": ..., "rows": [...]}.
    clock: "wall" or "cpu" (this process's CPU time: with one thread, robust to other work on a shared machine)."""
    known = ["nograd"] + registry.names(reward=True)
    methods = registry.names(reward=True) if methods is None else methods
    ref = registry.EXACT_CHECKPOINTED
    names = ["nograd", ref] + [m for m in methods if m not in ("nograd", ref)]
    bad = [m for m in names if m not in known]
    if bad:
        raise ValueError(f"methods: unknown {bad}; choose from {known}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    pipe, cond, note = setup(model, device, width)
    if unet_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    den, steps = make_steps(pipe, cond, names, n_steps, batch, guidance_scale, device, autocast)
    params = list(den.parameters())
    cuda = device.startswith("cuda")
    rows, oom = {}, {}
    for name, (step, forward) in steps.items():
        row = {"method": name, "label": registry.REGISTRY[name].label if name in registry.REGISTRY else "no-grad chain"}
        try:
            own = params + getattr(forward, "params", [])
            row["saved_bytes"] = saved_bytes(lambda: forward(0), exclude=own) if forward else 0
            row["peak_saved_bytes"] = peak_saved_bytes(lambda: forward(0), exclude=own) if forward else 0
            if cuda:
                torch.cuda.synchronize()
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            for w in range(2):  # warm-up, and the two steps whose peak memory is recorded
                step(w)
        except torch.cuda.OutOfMemoryError as e:  # e.g. DDPO's update holds all 50 steps' graphs at once
            den.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            oom[name] = {**row, "oom": str(e).splitlines()[0][:200]}
            continue
        if cuda:
            row["peak_cuda_mb"] = (torch.cuda.max_memory_allocated() - held) / 2**20
        rows[name] = row
    if "nograd" in oom or ref in oom:
        raise RuntimeError(f"the references ran out of memory: {sorted(oom)}")
    times = interleaved_times({n: s for n, (s, _) in steps.items() if n in rows}, rounds, device,
                              time.process_time if clock == "cpu" else time.perf_counter)
    ref_row = rows[ref]
    for name, row in rows.items():
        t = times[name]
        row["seconds"], row["times"] = statistics.median(t), t
        row["time_vs_nograd"] = statistics.median(a / b for a, b in zip(t, times["nograd"]))
        row["time_vs_full_bp_ckpt"] = statistics.median(a / b for a, b in zip(t, times[ref]))
        row["saved_vs_full_bp_ckpt"] = row["saved_bytes"] / max(ref_row["saved_bytes"], 1)
        if cuda:
            row["peak_vs_full_bp_ckpt"] = row["peak_cuda_mb"] / max(ref_row["peak_cuda_mb"], 1e-9)
    config = dict(model=model, note=note, n_steps=n_steps, batch=batch, rounds=rounds, device=device,
                  clock=clock, guidance_scale=guidance_scale, autocast=str(autocast) if autocast else None,
                  unet_checkpointing=unet_checkpointing, lora_params=sum(p.numel() for p in params if p.requires_grad),
                  unet_params=sum(p.numel() for p in pipe.unet.parameters()), threads=torch.get_num_threads(),
                  gpu=torch.cuda.get_device_name() if cuda else None, torch=torch.__version__)
    return {"config": config, "rows": list(rows.values()), "out_of_memory": list(oom.values())}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"one gradient step, {c['model']} ({c['note']}), {c['n_steps']} steps, batch {c['batch']}, {c['device']}"
             f"{' ' + c['gpu'] if c['gpu'] else ''}, autocast {c['autocast']}, {c['rounds']} rounds, {c['clock']} clock, "
             f"{c['threads']} thread(s)",
             f"{'method':<30}{'time s':>9}{'/nograd':>9}{'/ckpt BP':>9}{'saved MB':>10}{'/ckpt BP':>9}{'live MB':>9}"
             f"{'peak MB':>9}"]
    for r in result["rows"]:
        peak = f"{r['peak_cuda_mb']:>9.0f}" if "peak_cuda_mb" in r else f"{'-':>9}"
        lines.append(f"{r['label']:<30}{r['seconds']:>9.3f}{r['time_vs_nograd']:>9.2f}{r['time_vs_full_bp_ckpt']:>9.2f}"
                     f"{r['saved_bytes'] / 2**20:>10.1f}{r['saved_vs_full_bp_ckpt']:>9.3f}"
                     f"{r['peak_saved_bytes'] / 2**20:>9.1f}{peak}")
    lines += [f"{r['label']:<30} out of memory: {r['oom']}" for r in result.get("out_of_memory", [])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="tiny")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=None, help="registered methods (default: every one with a reward)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (> 1: two UNet passes)")
    p.add_argument("--autocast", choices=("bf16", "fp16"), default=None)
    p.add_argument("--unet-checkpointing", action="store_true", help="pipe.unet.enable_gradient_checkpointing()")
    p.add_argument("--width", type=int, default=None, help="sd15 only: scale the channels down (multiple of 32)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.autocast)
    result = run(a.model, a.steps, a.batch, a.methods, a.rounds, a.device, a.guidance, dtype, a.unet_checkpointing,
                 a.width, a.clock)
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
