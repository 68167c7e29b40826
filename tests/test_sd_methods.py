"""Every registered method trains LoRA on the tiny Stable Diffusion pipeline through build_sd + train(); ShortFT's
shortcut distilled from the pipeline; SDO on the latent; bf16 autocast; UNet gradient checkpointing; accelerate."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minialign.methods.sdo_latent import optimize_latent
from minialign.measure.memory import saved_bytes
from minialign.methods import REGISTRY
from minialign.methods.shortft import ShortFTConfig
from minialign.sd import SDDenoiser, add_lora, decode, schedule_from, tiny_pipeline
from minialign.rewards import image as R
from minialign.sd.build import (FixedPrompt, autocast_loss, batch_cond, build_sd, chain_of, distil_shortcut,
                                encode_images, latent_shape, sample_latents)
from minialign.train import TrainConfig, train

PROMPTS = ["a red digit seven", "a blue digit one"]
SHORTFT = dict(n_steps=10)  # 4 leading steps (751, 501, 251, 1) hold the anchors themselves: no jump to shortcut
PER_METHOD = {"sft_pg": dict(n_critic=1, n_generator=1)}


def _pipe():
    pipe = tiny_pipeline(seed=0)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return pipe


def _images(n=8, seed=0):
    """Coloured squares on black, [n, 3, 16, 16] in [-1, 1] (SFT-PG's 'real' data for the tiny pipeline)."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 3, 16, 16)
    for i in range(n):
        top, left = torch.randint(0, 8, (2,), generator=g).tolist()
        x[i, i % 3, top:top + 8, left:left + 8] = 1.0
    return x


@pytest.fixture(scope="module")
def shortcut():
    pipe = _pipe()
    cfg = ShortFTConfig(batch=2, **SHORTFT, **chain_of(pipe))
    return distil_shortcut(pipe, PROMPTS, cfg, guidance_scale=2.0, steps=30, batch=8, pool=16)


def test_distilled_shortcut_fits_the_pipelines_own_trajectory(shortcut):
    """The jumps ShortFT needs on the 10-step leading chain, distilled from the tiny pipeline: frozen, its regression
    loss falls (measured 3.2e-4 -> 2.3e-4), and each jump lands within 5% of the teacher's move from the teacher's
    endpoint. (On this random UNet, eps barely depends on x, so the base's own one step is already close to the
    multi-step endpoint: beating it is a mini-SD measurement, not a unit test.)"""
    sc, meta = shortcut
    assert sc.segments == {701: 501, 401: 301, 201: 1}
    assert not any(p.requires_grad for p in sc.parameters())
    assert meta["final_loss"] < 0.9 * meta["first_loss"], meta
    assert set(meta["fidelity"]) == {"701->501", "401->301", "201->1"}
    for seg, f in meta["fidelity"].items():
        assert f["shortcut_rms"] < 0.05 * f["teacher_move_rms"], (seg, f)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_method_trains_lora_on_the_pipeline(name, shortcut):
    """build_sd + 2 train() steps, guidance 2, brightness of the decoded image: finite losses and rewards, every LoRA
    B matrix moved (B = 0 at init, so this needs a gradient; those of the adapters a method's prepare hook added, if
    it added any), no base UNet weight moved."""
    pipe = _pipe()
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    add_lora(pipe)
    lora_b = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    m = REGISTRY[name]
    kw = {"batch": 2, "n_steps": 4, **(SHORTFT if m.extra is not None else {}), **PER_METHOD.get(name, {})}
    if m.needs_data:
        kw.update(data=encode_images(pipe, _images()))
    if m.extra is not None:
        kw.update(shortcut=shortcut[0])
    den, loss_fn, cfg = build_sd(name, pipe, R.brightness(), PROMPTS[:1] if m.needs_data else PROMPTS,
                                 guidance_scale=2.0, **kw)
    assert (cfg.spacing, cfg.offset) == ("leading", 1)  # the scheduler's chain
    hist = train(den, loss_fn, TrainConfig(steps=2, lr=1e-3, seed=0, progress=False))
    assert len(hist) == 2
    assert all(torch.isfinite(torch.tensor([r["loss"], r.get("reward", 0.0)])).all() for r in hist), hist
    b_now = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    added = set(b_now) - set(lora_b)  # adapters the method's prepare hook added (T-LoRA's segments) train instead
    for n in added or lora_b:
        assert (b_now[n] - lora_b.get(n, 0.0)).abs().max() > 0, n
    for n, p in pipe.unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n


def test_fixed_prompt_and_build_errors(shortcut):
    pipe = _pipe()
    den, loss_fn, _ = build_sd("sft_pg", pipe, None, PROMPTS[:1], data=encode_images(pipe, _images()), batch=2, n_steps=4)
    assert isinstance(den, FixedPrompt)
    x, t = torch.randn(3, *latent_shape(pipe)), torch.full((3,), 500)
    with torch.no_grad():  # one prompt for any batch size = the adapter given that prompt's embeddings per row
        torch.testing.assert_close(den(x, t), den.denoiser(x, t, batch_cond(pipe, PROMPTS[:1], 3)))
    with pytest.raises(ValueError, match="data: SFT-PG"):
        build_sd("sft_pg", pipe, None, PROMPTS[:1])
    with pytest.raises(ValueError, match="exactly one prompt"):
        build_sd("sft_pg", pipe, None, PROMPTS, data=encode_images(pipe, _images()))
    with pytest.raises(ValueError, match="shortcut: ShortFT needs"):
        build_sd("shortft", pipe, R.brightness(), PROMPTS, n_steps=10)
    with pytest.raises(ValueError, match="distilled for the jumps"):  # a shortcut for another chain is refused
        build_sd("shortft", pipe, R.brightness(), PROMPTS, n_steps=20, shortcut=shortcut[0])
    with pytest.raises(ValueError, match="no shortcut jump"):
        distil_shortcut(pipe, PROMPTS, ShortFTConfig(n_steps=4, **chain_of(pipe)))
    with pytest.raises(ValueError, match="not differentiable"):
        build_sd("draft_1", pipe, R.jpeg_compressibility(), PROMPTS)


def test_sdo_optimises_the_latent_through_the_vae():
    """minialign.methods.sdo_latent.optimize_latent (SDO: first step's UNet call with graph, skip path after) on the adapter with
    the VAE decoder: brightness rises over 8 iterations, the model gets no gradient."""
    pipe = _pipe()
    z, x0, hist = optimize_latent(SDDenoiser(pipe, 2.0), schedule_from(pipe), R.brightness(), shape=latent_shape(pipe), batch=2,
                                  cond=batch_cond(pipe, PROMPTS, 2), n_steps=4, iters=8, lr=0.2,
                                  decode=lambda x: decode(pipe, x))
    assert x0.shape == (2, 3, 16, 16)
    assert hist[-1]["reward"] > hist[0]["reward"] + 0.01, (hist[0], hist[-1])
    assert all(p.grad is None for p in pipe.unet.parameters())


def _full_bp_grads(pipe, loss_fn, den):
    loss, _ = loss_fn(den, 0, torch.Generator().manual_seed(0))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    return loss, torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def _trained_lora_pipe():
    pipe = _pipe()
    with torch.no_grad():
        for p in add_lora(pipe):
            p.add_(0.05 * torch.randn_like(p))  # B = 0 at init would leave A without a gradient
    return pipe


def test_bf16_autocast_loss_and_gradient_close_to_fp32():
    """Full backprop, 4 steps, batch 2 on CPU: bf16 autocast (8-bit mantissa) against float32. Measured: loss rel.
    diff 1.1e-3, gradient cosine 0.99996; tolerances: loss rel 2e-2, cosine > 0.99, and bf16 must differ at all."""
    pipe = _trained_lora_pipe()
    den, loss_fn, _ = build_sd("full_bp", pipe, R.brightness(), PROMPTS, guidance_scale=2.0, batch=2, n_steps=4)
    l32, g32 = _full_bp_grads(pipe, loss_fn, den)
    l16, g16 = _full_bp_grads(pipe, autocast_loss(loss_fn, torch.bfloat16), den)
    assert l16.dtype == torch.float32 and l16.item() != l32.item()
    assert abs(l16.item() - l32.item()) < 2e-2 * abs(l32.item()), (l16.item(), l32.item())
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    with pytest.raises(ValueError, match="dtype"):
        autocast_loss(loss_fn, torch.float32)


def test_unet_gradient_checkpointing_gives_the_same_gradient_and_saves_less():
    """pipe.unet.enable_gradient_checkpointing() in train mode: same loss and gradient as without (float32, measured
    bit-identical; tolerance 1e-5 rel), and fewer bytes saved for backward (measured 0.33x: so it was active)."""
    pipe = _trained_lora_pipe()
    den, loss_fn, _ = build_sd("full_bp", pipe, R.brightness(), PROMPTS, guidance_scale=2.0, batch=2, n_steps=4)
    den.train()
    l0, g0 = _full_bp_grads(pipe, loss_fn, den)
    plain = saved_bytes(lambda: loss_fn(den, 0, torch.Generator().manual_seed(0))[0])
    pipe.unet.enable_gradient_checkpointing()
    l1, g1 = _full_bp_grads(pipe, loss_fn, den)
    ckpt = saved_bytes(lambda: loss_fn(den, 0, torch.Generator().manual_seed(0))[0])
    assert l0.item() == pytest.approx(l1.item(), rel=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6 * g0.abs().max().item())
    assert ckpt < 0.8 * plain, (ckpt, plain)


def test_sample_latents_is_the_pipelines_chain():
    """Inference with the pipeline's own timesteps and final timestep = pipe(...) latents (DDIM, eta 0)."""
    pipe = _pipe()
    x_T = torch.randn(2, *latent_shape(pipe), generator=torch.Generator().manual_seed(1))
    ours = sample_latents(pipe, PROMPTS, x_T, 5, guidance_scale=3.0)
    theirs = pipe(PROMPTS, num_inference_steps=5, guidance_scale=3.0, latents=x_T.clone(), output_type="latent").images
    assert (ours - theirs).abs().max() < 1e-4


def test_accelerate_launch_two_processes_end_with_identical_lora(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun launcher; on a CPU-only machine two gloo processes:
    `--cpu` alone starts one in accelerate 1.x), DRaFT-1 on the tiny pipeline, 2 steps: each rank writes its LoRA
    weights; they are identical (gradients averaged across ranks) and moved. Measured 28 s of CPU for both ranks
    (61-72 s wall on the shared 2-core machine under load 7)."""
    worker = os.path.join(os.path.dirname(__file__), "accelerate_sd_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           worker, str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["num_processes"] for i in info] == [2, 2]
    assert ranks[0].keys() == ranks[1].keys() and any("lora_B" in k for k in ranks[0])
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert max((ranks[0][k]).abs().max().item() for k in ranks[0] if "lora_B" in k) > 0  # B moved from 0
    assert info[0]["rewards"] != info[1]["rewards"]  # each rank sampled its own batch


def test_sd15_configs_build_on_the_meta_device_at_sd15_size():
    """The GPU bench's model: SD 1.5's UNet and VAE from config only, without memory (meta device); their parameter
    counts are SD 1.5's published ones (UNet 859,520,964; VAE 83,653,863)."""
    from minialign.measure.sd_bench import sd15_parts

    with torch.device("meta"):
        parts = sd15_parts()
    assert next(parts.unet.parameters()).is_meta
    assert sum(p.numel() for p in parts.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in parts.vae.parameters()) == 83_653_863
    assert parts.scheduler.config.set_alpha_to_one is False and parts.scheduler.config.steps_offset == 1
    with pytest.raises(ValueError, match="width"):
        sd15_parts(width=48)


def test_sd_bench_measures_each_method_against_checkpointed_full_backprop():
    """minialign.measure.sd_bench.run on the tiny pipeline, one round: every asked method plus the two references, ratios
    against them (the reference's own ratio is 1), saved bytes (none for the no-grad chain)."""
    from minialign.measure.sd_bench import format_table, run

    res = run(model="tiny", n_steps=10, batch=1, methods=("draft_1", "shortft"), rounds=1)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["nograd", "full_bp_ckpt", "draft_1", "shortft"]
    assert rows["full_bp_ckpt"]["time_vs_full_bp_ckpt"] == 1.0 and rows["nograd"]["time_vs_nograd"] == 1.0
    assert rows["nograd"]["saved_bytes"] == 0 and all(rows[m]["saved_bytes"] > 0 for m in ("draft_1", "shortft"))
    assert all(r["seconds"] > 0 for r in rows.values())
    assert "ShortFT" in format_table(res)
    with pytest.raises(ValueError, match="methods: unknown"):
        run(model="tiny", methods=("sft_pg",))


def test_the_arena_runs_on_mini_sd_and_trains_only_the_lora():
    """tasks.SDTask: the arena's protocol on the shipped mini-SD (LoRA rank 4, guidance 3, brightness of the decoded
    image). Two methods, 3 steps each: every run trains the LoRA only (the shared pipeline's weights and adapter stay
    as loaded), and DRaFT-1's evaluation reward rises above the pretrained model's."""
    from minialign.measure import arena, tasks
    task = tasks.get("mini_sd_brightness")
    pipe = task.pipeline()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    res = arena.run(["draft_1", "ddpo"], task, steps={"draft_1": 3, "ddpo": 2}, seeds=[0], evals=1, progress=False,
                    keep_models=True)
    assert all(torch.equal(before[n], p) for n, p in pipe.unet.named_parameters())  # the base pipeline untouched
    tuned = dict(res["models"][("draft_1", 0)].unet.named_parameters())
    moved = {n for n, p in tuned.items() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    row = {r["method"]: r for r in res["rows"]}
    assert row["draft_1"]["final"] > res["runs"][0]["pretrained"] + 1e-3, row["draft_1"]
    assert torch.isfinite(torch.tensor(row["ddpo"]["final"]))
    with pytest.raises(ValueError, match="no LoRA"):
        from minialign.sd.adapter import LoRADenoiser

        LoRADenoiser(tiny_pipeline())
