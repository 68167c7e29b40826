"""DDPO: policy gradient with PPO-clip on the denoising MDP (Black et al. 2023, "Training diffusion
models with reinforcement learning", DDPO_IS, Sec. 4.3 and Alg. 1).

Each stochastic sampling step is an action of a Gaussian policy,
p_theta(x_s | x_t) = N(x_s; mu_theta(x_t), sigma_t^2 I). Sample a batch with eta = 1 under no_grad,
store states and per-step log-probs log p_old(x_s | x_t), score the samples, and standardise:

    A_b     = (r_b - mean r) / (std r + 1e-8)        over the batch, or within each condition
    ratio   = exp((log p_theta(x_s | x_t) - log p_old(x_s | x_t)) / D)     per sample and step, D = dims
    L_step  = mean_b max(-A_b * ratio, -A_b * clip(ratio, 1 - eps, 1 + eps)),  A_b clipped to [-a, a]
    loss    = mean over trained steps of L_step  (+ kl_coef * mean_step KL(p_theta || p_ref))

PPO's inner loop reuses one sampled batch for `inner_epochs` epochs of `minibatches` minibatches; here
each call of loss_fn is one such update (one optimiser step of train()), and a new batch is sampled
every inner_epochs * minibatches calls. On the first update after sampling the policy is the one that
sampled, so ratio = 1 exactly and the gradient is REINFORCE's, -mean_b A_b grad log p_theta, per step.
The reward is only evaluated, never differentiated: any reward works, JPEG size included.

The optional KL penalty (DPOK-style; not in DDPO) is the exact KL between the two Gaussian steps that
share sigma: KL = |mu_theta(x_t) - mu_ref(x_t)|^2 / (2 sigma_t^2), summed over dimensions, at the stored
states, against the pretrained model: a frozen copy of the model taken at the first update (or `reference`).

Resume: loss_fn.state_dict() holds the update count (the position in the PPO cycle), the stored batch, the
epoch's permutation and the reference's trainable parameters and buffers (its frozen parameters are the
model's, so it is rebuilt from the resumed model), so train()'s resume continues the cycle bit-exactly and the
KL still pulls towards the pretrained model, not towards the model at the resume.

Deviations, named:
- the log-probs in the ratio are divided by the number of dimensions D (a per-dimension log-prob), as the
  authors' ddpo-pytorch code averages them; the paper's ratio of densities would be exp(D * that). The clip
  range is tuned for this scale: summed log-probs made |ratio - 1| reach ~100 and clipped nearly everything
  after the first update (DDPO degenerated into one REINFORCE step per batch). With per-dimension log-probs,
  on the digits UNet (20 steps, batch 32, 2 x 2 updates per batch, AdamW 1e-4) the authors' 1e-4 still clipped
  88% of the ratios of the later updates; 1e-3 clipped 30% (7-74%), 3e-3 (the default here) 11% (0-30%),
  within PPO's usual 5-30%. The authors' 1e-4 fits their far smaller updates (LoRA on Stable Diffusion).
- the last step of an eta = 1 chain into abar = 1 is deterministic (sigma_t = 0, no log-prob): it is
  not an action and is not trained (Stable Diffusion's schedule ends at abar_0 < 1, so DDPO trains it
  there). The sampler is given min_sigma = 1e-6 so that it records a log-prob for every step; that step's
  log-prob is never used and its injected noise (1e-6) is negligible.
- per-condition standardisation uses the current batch (groups of one fall back to batch statistics);
  DDPO's per-prompt stat tracker keeps a running buffer of past rewards per prompt.
- a minibatch's loss covers all trained steps in one graph (one optimiser step per minibatch, as the
  authors' gradient accumulation over timesteps) but the authors backpropagate timestep by timestep,
  holding one step's activations at a time: bench.py's memory for DDPO is that of all N steps.
- `timestep_fraction < 1` trains one random subset of steps per minibatch, shared by its samples (the
  authors draw a permutation per sample).
- inner_epochs defaults to 2 ("several inner epochs"); the authors' configs mostly use 1.
- the first inner epoch keeps the sampling order (later ones shuffle), so that ratio = 1 holds bit-exactly.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch

from minialign.sampling import gaussian_kl, gaussian_log_prob, sample, step_mean
from minialign.schedule import prev_timesteps, step_coefficients
from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start
from minialign.methods.estimators import standardise

ADVANTAGES = ("batch", "per_condition")


@dataclass
class DDPOConfig(ChainConfig):
    eta: float = 1.0               # the chain must be stochastic: DDPO uses eta = 1
    inner_epochs: int = 2          # passes over each sampled batch
    minibatches: int = 1           # optimiser steps per pass
    clip_range: float = 3e-3       # PPO's epsilon (authors 1e-4; see the deviations)
    adv_clip: float = 5.0          # advantages clipped to [-adv_clip, adv_clip]
    advantage: str = "batch"       # batch | per_condition standardisation
    kl_coef: float = 0.0           # optional KL to the pretrained model (0 = DDPO)
    timestep_fraction: float = 1.0 # fraction of the stochastic steps trained per minibatch
    min_sigma: float = 1e-6        # noise floor (only the deterministic last step needs it; see above)


def ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range: float, adv_clip: float):
    """(mean_b max(-A ratio, -A clip(ratio, 1-eps, 1+eps)), ratio) with A clipped to [-adv_clip, adv_clip]."""
    adv = advantage.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def _check(cfg: DDPOConfig):
    if cfg.eta <= 0:
        raise ValueError(f"DDPO needs a stochastic chain (eta > 0; the paper uses 1), got eta={cfg.eta}")
    if cfg.advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {cfg.advantage!r}")
    if cfg.inner_epochs < 1 or cfg.minibatches < 1 or cfg.batch % cfg.minibatches:
        raise ValueError(f"need inner_epochs >= 1 and minibatches >= 1 dividing batch={cfg.batch}, "
                         f"got inner_epochs={cfg.inner_epochs}, minibatches={cfg.minibatches}")
    if not 0 < cfg.timestep_fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")


def trained_steps(schedule, cfg: DDPOConfig, ts: list[int], prev: list[int]) -> list[int]:
    """Indices of the chain's stochastic steps (sigma_t > 0): DDPO's actions."""
    trained = [i for i in range(len(ts)) if step_coefficients(schedule, ts[i], prev[i], cfg.eta).sigma > 0]
    if not trained:
        raise ValueError(f"no stochastic step to train in timesteps {ts} with eta={cfg.eta}")
    return trained


@torch.no_grad()
def collect(model, schedule, reward, cfg: DDPOConfig, ts: list[int], shape, cond, generator) -> dict:
    """Sample one batch with eta under no_grad: {states [x_T..x_0], log_probs (summed over dims, per step),
    cond, reward, adv (standardised)}: what the PPO epochs reuse."""
    x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
    x0, traj = sample(model, schedule, x_T, ts, cfg.eta, cond=c, generator=generator, final_timestep=cfg.final_timestep,
                      min_sigma=cfg.min_sigma, log_probs=True)
    r = reward(x0, c).detach()
    adv = standardise(r, c, cfg.advantage == "per_condition")
    return {"states": traj.states, "log_probs": traj.log_probs, "cond": c, "reward": r, "adv": adv}


def kl_to_reference(ref, schedule, mean, x_t, t: int, s: int, eta: float, sigma: float, cond) -> torch.Tensor:
    """KL(p_theta || p_ref) of one step at x_t: |mu_theta - mu_ref|^2 / (2 sigma^2), summed over dims, batch mean."""
    with torch.no_grad():
        ref_mean, _ = step_mean(ref, schedule, x_t, t, s, eta, cond)
    return gaussian_kl(mean, ref_mean, sigma).mean()


def ppo_terms(model, schedule, cfg: DDPOConfig, ts, prev, buf: dict, idx, steps: list[int], dim: int, ref=None):
    """One minibatch `idx` of the stored batch, over the trained `steps`: per-step PPO losses (+ kl_coef KL),
    ratios and KLs (lists, one entry per step)."""
    c = None if buf["cond"] is None else buf["cond"][idx]
    losses, ratios, kls = [], [], []
    for i in steps:
        x_t, x_s = buf["states"][i][idx], buf["states"][i + 1][idx]
        mean, sigma = step_mean(model, schedule, x_t, ts[i], prev[i], cfg.eta, c)
        sigma = max(sigma, cfg.min_sigma)
        # per-dimension log-probs, as ddpo-pytorch (the sum over D dims, divided by D in both, so that the
        # first ratio stays bit-exactly 1); PPO's clip range is tuned for this scale
        log_prob = gaussian_log_prob(x_s, mean, sigma) / dim
        old = buf["log_probs"][i][idx] / dim
        loss_i, ratio = ppo_clip_loss(log_prob, old, buf["adv"][idx], cfg.clip_range, cfg.adv_clip)
        if cfg.kl_coef > 0:
            kl = kl_to_reference(ref, schedule, mean, x_t, ts[i], prev[i], cfg.eta, sigma, c)
            loss_i = loss_i + cfg.kl_coef * kl
            kls.append(kl.detach())
        losses.append(loss_i)
        ratios.append(ratio.detach())
    return losses, ratios, kls


class DDPOLoss:
    """DDPO's loss_fn(model, step, generator): one PPO update per call. Its state between calls: the update
    count (the position in the cycle of inner_epochs * minibatches updates per sampled batch), the stored batch,
    the epoch's permutation and the KL reference."""

    def __init__(self, schedule, reward, cfg: DDPOConfig, shape, cond, reference):
        _check(cfg)
        self.schedule, self.reward, self.cfg, self.shape, self.cond = schedule, reward, cfg, shape, cond
        self.ts = chain_timesteps(schedule, cfg)
        self.prev = prev_timesteps(self.ts, cfg.final_timestep)
        self.trained = trained_steps(schedule, cfg, self.ts, self.prev)
        self.updates_per_batch = cfg.inner_epochs * cfg.minibatches
        self.dim = math.prod(shape)
        self.updates, self.buf, self.perm, self.ref = 0, None, None, reference
        self.ref_state = None  # the copied reference's trainable parameters and buffers (None with `reference`)

    def _minibatch(self, u: int, generator) -> torch.Tensor:
        """Rows of update u of the cycle; epoch 0 keeps the sampling order (so the first ratio is bit-exactly 1)."""
        cfg = self.cfg
        epoch, mb = divmod(u, cfg.minibatches)
        if mb == 0:
            self.perm = torch.arange(cfg.batch) if epoch == 0 else torch.randperm(cfg.batch, generator=generator)
        size = cfg.batch // cfg.minibatches
        return self.perm[mb * size:(mb + 1) * size].to(self.buf["reward"].device)

    def _steps(self, generator) -> list[int]:
        """The trained steps of this update: all, or a random subset of timestep_fraction of them."""
        if self.cfg.timestep_fraction == 1:
            return self.trained
        n_train = max(1, round(self.cfg.timestep_fraction * len(self.trained)))
        pick = torch.randperm(len(self.trained), generator=generator)[:n_train].sort().values
        return [self.trained[i] for i in pick.tolist()]

    def _reference(self, model, step: int):
        """The KL reference: `reference`, or a frozen copy of the pretrained model (taken at the first update, or
        rebuilt after a resume from the model's frozen parameters and the saved trainable ones)."""
        if self.ref is not None:
            return self.ref
        if self.updates > 0 and self.ref_state is None:
            raise RuntimeError("DDPO: the loaded state has no KL reference (was it saved with kl_coef = 0?)")
        if self.updates == 0 and step > 0:
            raise ValueError(f"step: a fresh DDPO loss_fn with kl_coef > 0 first called at step {step} cannot know the "
                             f"pretrained model; pass reference= or resume from a train() checkpoint")
        ref = copy.deepcopy(model).eval()
        if self.ref_state is None:  # the first update: the model is the pretrained one; keep what training changes
            kept = {k for k, v in model.state_dict(keep_vars=True).items()
                    if not isinstance(v, torch.nn.Parameter) or v.requires_grad}
        else:
            kept = set(self.ref_state)
            unexpected = ref.load_state_dict(self.ref_state, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"loaded DDPO state: reference entries {unexpected[:3]} are not in the model")
        self.ref_state = {k: v for k, v in ref.state_dict().items() if k in kept}  # views of the reference's own
        self.ref = ref.requires_grad_(False)
        return self.ref

    def state_dict(self) -> dict:
        """Everything the next call depends on besides the model, the optimiser and the RNGs (train() saves it)."""
        return {"updates": self.updates, "buf": self.buf, "perm": self.perm, "ref": self.ref_state}

    def load_state_dict(self, state: dict):
        self.updates, self.buf, self.perm, self.ref_state = state["updates"], state["buf"], state["perm"], state["ref"]
        if self.ref_state is not None:
            self.ref = None  # rebuilt from the resumed model at the next call

    def __call__(self, model, step: int, generator: torch.Generator):
        cfg = self.cfg
        ref = self._reference(model, step) if cfg.kl_coef > 0 else None
        u = self.updates % self.updates_per_batch
        if u == 0:
            self.buf = collect(model, self.schedule, self.reward, cfg, self.ts, self.shape, self.cond, generator)
        idx = self._minibatch(u, generator)
        losses, ratios, kls = ppo_terms(model, self.schedule, cfg, self.ts, self.prev, self.buf, idx,
                                        self._steps(generator), self.dim, ref)
        self.updates += 1
        ratio = torch.stack(ratios)
        stats = {
            "reward": self.buf["reward"].mean().item(),
            "resampled": float(u == 0),
            "ratio_dev": (ratio - 1).abs().max().item(),
            "clip_frac": ((ratio - 1).abs() > cfg.clip_range).float().mean().item(),
            "approx_kl": (0.5 * ratio.log() ** 2).mean().item(),
        }
        if kls:
            stats["kl"] = torch.stack(kls).mean().item()
        return torch.stack(losses).mean(), stats


def make_loss(schedule, reward, cfg: DDPOConfig, *, shape, cond=None, reference: Optional[torch.nn.Module] = None):
    """loss_fn(model, step, generator) -> (PPO loss of one minibatch, stats).

    stats: reward (mean reward of the batch being trained on), resampled (1 on a call that sampled),
    ratio_dev (max |ratio - 1|), clip_frac, approx_kl (0.5 mean (log ratio)^2), kl (if kl_coef > 0).
    """
    return DDPOLoss(schedule, reward, cfg, shape, cond, reference)
