"""Step math against diffusers' schedulers (the oracle), and argument checking."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from minialign.schedule import Schedule, q_sample, step_coefficients, timesteps

def _ddim(schedule_name, T, spacing, offset=0):
    return DDIMScheduler(num_train_timesteps=T, beta_schedule=schedule_name, beta_start=1e-4, beta_end=2e-2,
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing, steps_offset=offset)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 10, 50, 100])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
def test_ddim_step_matches_diffusers(eta, n, spacing, offset):
    T = 1000
    ours = Schedule.make("scaled_linear", T, 1e-4, 2e-2)
    ref = _ddim("scaled_linear", T, spacing, offset)
    ref.set_timesteps(n)
    ts = timesteps(T, n, spacing, offset)
    assert ts == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(n)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
        eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
        z = torch.randn(x.shape, generator=g, dtype=torch.float64)
        expected = ref.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        c = step_coefficients(ours, t, s, eta)
        got = c.a * x + c.b * eps + c.sigma * z
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule_name", ["linear", "sigmoid", "scaled_linear"])
@pytest.mark.parametrize("n", [10, 25, 1000])
def test_ddpm_step_is_eta_one_and_matches_diffusers(schedule_name, n, monkeypatch):
    T = 1000
    ours = Schedule.make(schedule_name, T, 1e-4, 2e-2)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule_name, beta_start=1e-4, beta_end=2e-2,
                        clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(n)
    ts = timesteps(T, n, "leading")
    assert ts == ref.timesteps.tolist()
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    for t in ts[:: max(1, n // 10)] + [ts[-1]]:
        j = ts.index(t)
        s = ts[j + 1] if j + 1 < len(ts) else -1
        x = torch.randn(3, 2, 4, 4, generator=g)
        eps = torch.randn(x.shape, generator=g)
        z = torch.randn(x.shape, generator=g)
        # DDPMScheduler draws its own noise: hand it ours through the function it draws with
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: z)
        expected = ref.step(eps, t, x).prev_sample
        c = step_coefficients(ours, t, s, eta=1.0)
        got = (c.a * x.double() + c.b * eps.double() + c.sigma * z.double()).float()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_q_sample_matches_diffusers_add_noise():
    ours = Schedule.make("linear", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x0, noise = torch.randn(6, 2), torch.randn(6, 2)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(q_sample(ours, x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)


def test_cosine_schedule_is_valid():
    s = Schedule.make("cosine", 1000)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    assert s.alphas_cumprod[-1] < 1e-3 and s.alphas_cumprod[0] > 0.99


def test_sigmoid_toy_schedule_barely_noises():
    # SFT-PG's 10-step toy: sigmoid betas 1e-5..1e-2 leave abar_T ~ 0.95 (DESIGN 4.2)
    s = Schedule.make("sigmoid", 10, 1e-5, 1e-2)
    assert 0.94 < s.abar(9) < 0.96


def test_config_round_trip():
    s = Schedule.make("sigmoid", 10, 1e-5, 1e-2)
    torch.testing.assert_close(Schedule.make(**s.config()).betas, s.betas, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call,argname",
    [
        (lambda: Schedule.make("quadratic", 10), "schedule"),
        (lambda: Schedule.make("linear", 0), "T"),
        (lambda: step_coefficients(Schedule.make("linear", 10), 5, 3, -0.1), "eta"),
        (lambda: step_coefficients(Schedule.make("linear", 10), 3, 5, 0.0), "t="),
        (lambda: timesteps(100, 101), "n (number of sampling steps)"),
        (lambda: timesteps(100, 10, "middle"), "spacing"),
        (lambda: q_sample(Schedule.make("linear", 10), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(3, 3)), "noise"),
    ],
)
def test_bad_arguments_name_themselves(call, argname):
    with pytest.raises(ValueError, match=argname.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_eta_above_one_is_refused_where_diffusers_gives_nan():
    """eta > 1 makes sigma_t^2 exceed 1 - abar_s, so the step's direction coefficient sqrt(1 - abar_s - sigma^2) is
    imaginary: diffusers' DDIMScheduler returns NaN, and a clamp at 0 would give a wrong mean without an error."""
    from minialign.methods.chain import ChainConfig

    s = Schedule.make("linear", 1000)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2)
    sched.set_timesteps(10)
    x, eps = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    out = sched.step(eps, 500, x, eta=1.5, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isnan(out).any()  # the oracle has no value there
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        step_coefficients(s, 500, 400, 1.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ChainConfig(eta=1.01)
    step_coefficients(s, 500, 400, 1.0)  # the edges stay allowed
    ChainConfig(eta=1.0)


def test_chain_config_final_timestep_is_checked():
    from minialign.methods.chain import ChainConfig

    assert ChainConfig().final_timestep == -1
    assert ChainConfig(final_timestep=0).final_timestep == 0
    for bad in (-2, 1.0, True):
        with pytest.raises(ValueError, match="final_timestep"):
            ChainConfig(final_timestep=bad)
