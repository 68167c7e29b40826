"""SDO, Shortcut Diffusion Optimization: "You Only Look One Step" (Dou et al. 2025).

One sampling step from t to the next timestep s is linear in x_t once eps is known (schedule.py):

    x_s = a_t x_t + b_t eps(x_t, t) + sigma_t z,        a_t = sqrt(abar_s / abar_t)

Unrolling N steps t_0 > t_1 > ... > t_{N-1} (the last lands on x_0, abar = 1) gives the skip form

    x_0 = (prod_{i} a_i) x_T  +  sum_i (prod_{j > i} a_j) (b_i eps(x_{t_i}, t_i) + sigma_i z_i)

with prod_{j >= i} a_j = sqrt(abar_final / abar_{t_i}) (the product telescopes; it does not depend on eta).
Full backprop differentiates every eps(x_{t_i}) through its input too, so d x_0 / d x_{t_i} is a product of N - i
matrices (a_j I + b_j d eps_j / d x_j). SDO keeps the graph of ONE network call and replaces every other
eps by the constant sg[eps], while the linear update a_t x_t + b_t sg[eps] stays in the graph, so a gradient
reaches earlier quantities along the skip path:

  latent optimisation (the authors' released scripts): the optimised latent z = x_{t_j} enters the retained
  step (the first optimised step) with graph to its input:
      d x_0 / d z  ~  (prod_{i > j} a_i) (a_j I + b_j d eps(z, t_j) / d z)
  parameter fine-tuning (no released code; the natural analogue): keep the graph at step k only,
      d x_0 / d theta  ~  (prod_{i > k} a_i) b_k d eps(sg[x_{t_k}], t_k) / d theta
  where the coefficient (prod_{i > k} a_i) b_k = lambda_{t_{k+1}} - lambda_{t_k}, lambda = sqrt((1 - abar) / abar)
  (for DDIM) is the step's share of the ODE in the x / sqrt(abar) coordinates.

The forward pass is the ordinary sample (SDO changes only what backward sees), so the reward that is logged is the
real sample's reward. Relations: k = last step is DRaFT-1 exactly; ReFL also keeps one random late step but scores
x0_hat instead of running the chain on; AlignProp detaches eps the same way for its first N - K steps.

The "skip path only" ablation (`skip_only`) drops the network Jacobian of the retained step as well: d x_0 / d z =
prod a_i, a pure rescaling of the reward gradient. It matters only for latents: for parameters nothing upstream of
step k depends on theta, so SDO's parameter gradient already has no input Jacobian and the ablation is SDO itself.

Deviations: the paper does not say how k is chosen for parameters; here `retained` = "first" | "last" | "random"
(uniform over the N steps, per iteration) | an int index (0 = the first step, from x_T). The random-k gradient is
not rescaled by N (the optimiser's step size absorbs it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from minialign.rewards.base import require_differentiable, reward_with_graph
from minialign.sampling import plan_full, plan_one_step, sample
from minialign.schedule import prev_timesteps, step_coefficients
from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start

RETAINED = ("first", "last", "random")


@dataclass
class SDOConfig(ChainConfig):
    retained: Union[str, int] = "random"   # the step whose network call keeps its graph: first | last | random | index

    def __post_init__(self):
        super().__post_init__()
        check_retained(self.retained, self.n_steps)


def check_retained(retained, n: int) -> None:
    if isinstance(retained, bool) or not (retained in RETAINED or isinstance(retained, int)):
        raise ValueError(f"retained must be one of {RETAINED} or an int step index in [0, {n - 1}], got {retained!r}")
    if isinstance(retained, int) and not 0 <= retained < n:
        raise ValueError(f"retained must be an int step index in [0, {n - 1}] (n_steps={n}), got {retained}")


def retained_index(retained, n: int, generator: Optional[torch.Generator] = None) -> int:
    """The 0-based index (sampling order, 0 = the step from x_T) of the step that keeps its graph."""
    check_retained(retained, n)
    if retained == "first":
        return 0
    if retained == "last":
        return n - 1
    if retained == "random":
        return int(torch.randint(n, (1,), generator=generator).item())
    return retained


LATENT_PLANS = ("sdo", "sdo_skip", "full")


def latent_plan(n: int, plan: str = "sdo", checkpoint: bool = False):
    """The sampler plan for differentiating x_0 w.r.t. the chain's first latent (latent optimisation).

    sdo: the first step keeps its graph, through its input too; sdo_skip: no network Jacobian at all (prod a_i);
    full: every step (checkpoint=True recomputes each call in backward)."""
    if plan == "sdo":
        return plan_one_step(n, 0, input_grad=True)
    if plan == "sdo_skip":
        return plan_one_step(n, 0, input_grad=False)
    if plan == "full":
        return plan_full(n, checkpoint)
    raise ValueError(f"plan must be one of {LATENT_PLANS}, got {plan!r}")


def skip_products(schedule, ts: Sequence[int], final_timestep: int = -1) -> list[float]:
    """[P_0, ..., P_N]: P_i = prod_{j >= i} a_j, the linear path's coefficient of x_{t_i} in x_0 (P_N = 1).
    Closed form: P_i = sqrt(abar_final / abar_{t_i})."""
    prev = prev_timesteps(list(ts), final_timestep)
    out = [1.0]
    for t, s in reversed(list(zip(ts, prev))):
        out.append(out[-1] * step_coefficients(schedule, t, s, 0.0).a)
    return out[::-1]


def unrolled_coefficients(schedule, ts: Sequence[int], eta: float = 0.0, final_timestep: int = -1):
    """(A, c) of the skip form x_0 = A x_T + sum_i c_i eps_i + sum_i d_i z_i: A = prod_i a_i and
    c_i = (prod_{j > i} a_j) b_i, as python floats (d_i = (prod_{j > i} a_j) sigma_i is returned too)."""
    prev = prev_timesteps(list(ts), final_timestep)
    P = skip_products(schedule, ts, final_timestep)
    coef = [step_coefficients(schedule, t, s, eta) for t, s in zip(ts, prev)]
    return P[0], [P[i + 1] * c.b for i, c in enumerate(coef)], [P[i + 1] * c.sigma for i, c in enumerate(coef)]


def make_loss(schedule, reward, cfg: SDOConfig, *, shape, cond=None):
    """loss_fn(model, step, generator) -> (-mean reward, stats) with one retained network call.

    stats: reward (mean reward of the chain's samples: the real samples, SDO changes only backward), k (the
    retained step's index this iteration).
    """
    require_differentiable(reward, "SDO")
    ts = chain_timesteps(schedule, cfg)
    n = len(ts)

    def loss_fn(model, step: int, generator: torch.Generator):
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        k = retained_index(cfg.retained, n, generator)
        x0, _ = sample(model, schedule, x_T, ts, cfg.eta, plan_one_step(n, k), cond=c, generator=generator, final_timestep=cfg.final_timestep)
        r = reward_with_graph(reward, x0, c, "SDO")
        return -r.mean(), {"reward": r.mean().item(), "k": float(k)}

    return loss_fn

