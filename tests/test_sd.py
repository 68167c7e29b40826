"""The Stable Diffusion adapter against diffusers itself, on a random tiny pipeline (offline, float32 unless said)."""
import time

import pytest
import torch

from minialign import methods
from minialign.rewards import Reward
from minialign.sampling import plan_full, sample
from minialign.sd import (SDDenoiser, add_lora, decode, encode_prompt, final_timestep_of, latent_reward,
                          load_pipeline, save_lora, schedule_from, tiny_pipeline, timesteps_from)

PROMPTS = ["a red digit seven", "a blue digit one"]
LATENT = (4, 8, 8)


@pytest.fixture(scope="module")
def base():
    return tiny_pipeline(seed=0)


def _fresh():
    return tiny_pipeline(seed=0)


def _latents(b=2, seed=1):
    return torch.randn((b, *LATENT), generator=torch.Generator().manual_seed(seed))


def _ours(pipe, x_T, n, w, prompts=PROMPTS):
    x0, _ = sample(SDDenoiser(pipe, w), schedule_from(pipe), x_T, timesteps_from(pipe, n), eta=0.0,
                   cond=encode_prompt(pipe, prompts), final_timestep=final_timestep_of(pipe))
    return x0


def _theirs(pipe, x_T, n, w, output_type="pt", prompts=PROMPTS):
    return pipe(prompts, num_inference_steps=n, guidance_scale=w, latents=x_T.clone(), output_type=output_type, eta=0.0).images


MEAN_BRIGHTNESS = Reward(lambda img, c: img.flatten(1).mean(1), "mean brightness")


def test_tokenizer_spells_caption_words(base):
    assert base.tokenizer.tokenize("a red digit seven") == ["a</w>", "red</w>", "digit</w>", "seven</w>"]
    assert len(base.tokenizer) > 100
    from minialign.sd.tiny import WORDS
    # every word one token: "green" used to split into 4 because the merge (r, e) of "red" came first
    assert [w for w in WORDS if len(base.tokenizer.tokenize(w)) != 1] == []


@pytest.mark.parametrize("w", [1.0, 4.0])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_adapter_ddim_reproduces_pipeline(base, w, alpha_to_one):
    """The shared sampler + adapter = StableDiffusionPipeline.__call__ (DDIM, eta = 0), with and without guidance.
    Measured: latents <= 1.4e-5 (float64 vs diffusers' float32 alphas_cumprod), images <= 6e-7 apart (float32);
    tolerance 1e-4 (a wrong final timestep moves the latents by 3e-2). alpha_to_one=False is SD 1.x's
    scheduler (last step lands on abar_0: final_timestep=0)."""
    from diffusers import DDIMScheduler

    pipe = base
    old = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(old.config, set_alpha_to_one=alpha_to_one)
    try:
        x_T, n = _latents(), 5
        with torch.no_grad():
            ours = _ours(pipe, x_T, n, w)
            img = ((decode(pipe, ours) + 1) / 2).clamp(0, 1)
        lat_ref = _theirs(pipe, x_T, n, w, output_type="latent")
        img_ref = _theirs(pipe, x_T, n, w)
    finally:
        pipe.scheduler = old
    assert (ours - x_T).abs().max() > 0.1  # the chain moved
    assert (ours - lat_ref).abs().max() < 1e-4, (ours - lat_ref).abs().max()
    assert img.shape == img_ref.shape == (2, 3, 16, 16)
    assert (img - img_ref).abs().max() < 1e-4, (img - img_ref).abs().max()
    if w > 1:  # guidance changes the result, so the test above would catch a missing or wrong guidance
        with torch.no_grad():
            assert (_ours(pipe, x_T, n, 1.0) - ours).abs().max() > 1e-3


def test_per_step_conditioning_hook(base):
    """cond_at swaps the prompt for the late steps: the result differs from the unswapped chain, and equals the
    chain run with the other prompt when the hook swaps at every step."""
    a, b = encode_prompt(base, PROMPTS[:1] * 2), encode_prompt(base, PROMPTS[1:] * 2)
    sch, ts, x_T = schedule_from(base), timesteps_from(base, 4), _latents()
    run = lambda d, c: sample(d, sch, x_T, ts, cond=c)[0]  # noqa: E731
    with torch.no_grad():
        plain, other = run(SDDenoiser(base, 3.0), a), run(SDDenoiser(base, 3.0), b)
        always = run(SDDenoiser(base, 3.0, cond_at=lambda t, c: b), a)
        late = run(SDDenoiser(base, 3.0, cond_at=lambda t, c: b if t < 500 else c), a)
    assert torch.equal(always, other)
    assert (late - plain).abs().max() > 1e-4 and (late - other).abs().max() > 1e-4


def test_mixed_timestep_call_routes_each_row_to_its_own_steps_prompt(base):
    """Issue 19 item 1: one network call whose rows sit at different timesteps (RLR's batched likelihood-ratio terms)
    with a step-range prompt hook equals the separate per-timestep calls, row by row, value and gradient. Before the
    fix every row took the prompt of t[0] (measured: rows at t = 200 off by up to 0.19)."""
    a, b = encode_prompt(base, PROMPTS[:1] * 4), encode_prompt(base, PROMPTS[1:] * 4)
    hook = lambda t, c: b if t < 500 else c  # noqa: E731  the late (fine) steps get the other prompt
    den = SDDenoiser(base, 3.0, cond_at=hook)
    x = _latents(4).requires_grad_(True)
    t = torch.tensor([800, 200, 800, 200])
    mixed = den(x, t, a)
    hi, lo = torch.tensor([0, 2]), torch.tensor([1, 3])
    with torch.no_grad():
        sep_hi = SDDenoiser(base, 3.0)(x[hi], t[hi], a[hi])
        sep_lo = SDDenoiser(base, 3.0)(x[lo], t[lo], b[lo])
        wrong = SDDenoiser(base, 3.0)(x[lo], t[lo], a[lo])
    torch.testing.assert_close(mixed[hi], sep_hi, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[lo], sep_lo, atol=1e-5, rtol=1e-5)
    assert (sep_lo - wrong).abs().max() > 1e-3  # the hook matters at these rows
    g = torch.autograd.grad(mixed[lo].sum(), x)[0]  # each row's gradient stays on its own row
    assert g[hi].abs().max() == 0 and g[lo].abs().max() > 0
    with torch.no_grad():  # a one-timestep call and a scalar t still take the hook's conditioning
        torch.testing.assert_close(den(x, torch.tensor(200), a), SDDenoiser(base, 3.0)(x, torch.full((4,), 200), b))
    with pytest.raises(ValueError, match="cond_at must return"):
        SDDenoiser(base, 3.0, cond_at=lambda t, c: c[:1])(x.detach(), t, a)


def test_lora_gradient_through_chain_matches_finite_differences():
    """A reward on decoded images, 2-step chain with plan_full, double precision: the LoRA gradient is nonzero
    and its directional derivative matches central differences (rel 1e-5)."""
    pipe = _fresh()
    pipe.unet.double(), pipe.vae.double().requires_grad_(False), pipe.text_encoder.double()
    params = add_lora(pipe)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # B = 0 at init would leave A without gradient
    den, sch, ts = SDDenoiser(pipe, 2.0), schedule_from(pipe), timesteps_from(pipe, 2)
    cond, x_T = encode_prompt(pipe, PROMPTS), _latents().double()
    reward = latent_reward(pipe, MEAN_BRIGHTNESS)

    def loss():
        return -reward(sample(den, sch, x_T, ts, plan=plan_full(2), cond=cond)[0], None).mean()

    grads = torch.autograd.grad(loss(), params)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) == len(params)
    assert not any(p.grad is not None for p in pipe.vae.parameters())
    h, sq = 1e-4, sum((g * g).sum() for g in grads).item()
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(h * g)
        up = loss().item()
        for p, g in zip(params, grads):
            p.sub_(2 * h * g)
        down = loss().item()
    assert abs((up - down) / (2 * h) - sq) < 1e-5 * sq, ((up - down) / (2 * h), sq)


def test_lora_save_and_diffusers_load_lora_weights(tmp_path):
    """LoRA weights saved in diffusers' format reload through pipe.load_lora_weights to identical outputs."""
    pipe = _fresh()
    params = add_lora(pipe)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p))
    x_T = _latents()
    trained = _theirs(pipe, x_T, 3, 3.0)
    save_lora(pipe, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    fresh = _fresh()
    before = _theirs(fresh, x_T, 3, 3.0)
    fresh.load_lora_weights(str(tmp_path))
    after = _theirs(fresh, x_T, 3, 3.0)
    assert (before - trained).abs().max() > 1e-3  # the LoRA changes the images
    assert (after - trained).abs().max() < 1e-6, (after - trained).abs().max()
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(_fresh(), tmp_path / "none")


def test_load_pipeline_missing_id_fails_fast_and_local_dir_loads(base, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match="huggingface-cli download"):
        load_pipeline("nobody-here/no-such-stable-diffusion")
    assert time.perf_counter() - start < 10
    with pytest.raises(OSError, match="no such directory"):
        load_pipeline(str(tmp_path / "missing" / "dir"))
    base.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    x_T = _latents()
    assert torch.equal(_theirs(loaded, x_T, 2, 2.0), _theirs(base, x_T, 2, 2.0))


@pytest.mark.parametrize("name", ["full_bp", "full_bp_ckpt", "draft_1", "alignprop", "draft_lv", "refl", "sdo", "rlr", "ddpo"])
def test_methods_run_on_the_adapter(name):
    """Registered methods build on the adapter (cond = the batch's packed embeddings [B, 2, L, D]); one loss_fn
    call + backward reaches every LoRA B matrix and nothing else. (ShortFT needs a shortcut distilled from
    mini-SD and SFT-PG data latents: not here yet.)"""
    pipe = _fresh()
    pipe.vae.requires_grad_(False)
    params = add_lora(pipe)
    den = SDDenoiser(pipe, 2.0)
    cond = encode_prompt(pipe, PROMPTS)
    loss_fn, cfg = methods.build(name, schedule_from(pipe), latent_reward(pipe, MEAN_BRIGHTNESS), shape=LATENT,
                                 cond=cond, batch=2, n_steps=4, spacing="leading", offset=1)
    loss, stats = loss_fn(den, 0, torch.Generator().manual_seed(0))
    loss.backward()
    lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    assert isinstance(stats["reward"], float)


@pytest.mark.parametrize("name", ["full_bp", "sdo"])
def test_registry_chain_on_sd1x_scheduler_ends_where_the_pipeline_ends(name):
    """Issue 20 item 4: build_sd passes final_timestep_of(pipe) into the method's ChainConfig, so on SD 1.x's scheduler
    (set_alpha_to_one=False: the last step lands on abar_0) the image a method scores is the one
    StableDiffusionPipeline.__call__ returns from the same x_T (DDIM, eta 0, guidance 3). Measured 5e-7 apart;
    ending at abar = 1 instead (final_timestep -1, the chains before) is 1.8e-3 away (checked: > 5e-4)."""
    from diffusers import DDIMScheduler
    from minialign.sd.build import build_sd, latent_shape

    pipe = _fresh()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)
    seen = []
    store = Reward(lambda img, c: seen.append(img.detach()) or img.flatten(1).mean(1), "store", True)
    prompts = PROMPTS
    den, loss_fn, cfg = build_sd(name, pipe, store, prompts, guidance_scale=3.0, n_steps=4, batch=2, eta=0.0)
    assert cfg.final_timestep == 0 == final_timestep_of(pipe) and (cfg.spacing, cfg.offset) == ("leading", 1)
    loss_fn(den, 0, torch.Generator().manual_seed(3))
    x_T = torch.randn((2, *latent_shape(pipe)), generator=torch.Generator().manual_seed(3))  # the chain's draw_start
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, latents=x_T.clone(), output_type="pt", eta=0.0).images
    ours = ((seen[0] + 1) / 2).clamp(0, 1)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()
    _, loss_fn_data, _ = build_sd(name, pipe, store, prompts, guidance_scale=3.0, n_steps=4, batch=2, eta=0.0,
                                  final_timestep=-1)
    loss_fn_data(den, 0, torch.Generator().manual_seed(3))
    assert (((seen[-1] + 1) / 2).clamp(0, 1) - theirs).abs().max() > 5e-4


def test_bad_inputs(base):
    with pytest.raises(ValueError, match="guidance_scale"):
        SDDenoiser(base, -1.0)
    with pytest.raises(ValueError, match="cond must be prompt embeddings"):
        SDDenoiser(base, 2.0)(_latents(), torch.tensor([10, 10]), None)
    with pytest.raises(ValueError, match="needs unconditional"):
        SDDenoiser(base, 2.0)(_latents(), torch.tensor([10, 10]), encode_prompt(base, PROMPTS)[:, 1])
    with pytest.raises(ValueError, match="prompts"):
        encode_prompt(base, [])
