"""SFT-PG: Shortcut Fine-Tuning with Policy Gradient (Fan & Lee, ICML 2023).

A few-step stochastic sampler, x_T ~ N(0, I) and then N transitions

    x_{i+1} ~ p_theta(. | x_i) = N(mu_theta(x_i, t_i), sigma_i^2 I),   mu_theta = a_i x_i + b_i eps_theta(x_i, t_i)

is fine-tuned to minimise an integral probability metric (IPM) to the data instead of imitating the
backward process, so it may leave that process and find a "shortcut" (paper Sec. 3-4, Alg. 1):

    min_theta max_f  E_{x_0 ~ p_theta}[f(x_0)] - E_{x ~ data}[f(x)]

Critic f [B, ...] -> [B]: minimise L_f = mean f(real) - mean f(x_0)  (+ optional gradient penalty).
Generator: with f fixed, the gradient of E[f(x_0)] is a policy gradient over the chain's transitions

    grad_theta E[f(x_0)] = E[ sum_i (f(x_0) - B(x_i, i)) grad_theta log p_theta(x_{i+1} | x_i) ]

for any baseline B(x_i, i) that does not look at the action x_{i+1}. B is learned by regression,
L_B = mean_i (B(x_i, i) - sg[f(x_0)])^2, and the paper's baseline regularisation lets the same
squared error also reach the critic: L_f += lambda * mean_i (sg[B(x_i, i)] - f(x_0))^2 (lambda = 1 is
exactly the authors' code, which backpropagates (B - f)^2 into both). The generator minimises

    L_theta = mean over stored transitions of A * log N(x_{i+1}; mu_theta(x_i), sigma_i^2 I) / D,
    A = sg[f(x_0) - B(x_i, i)]

(log-prob averaged over the D dimensions, as DESIGN and the authors' image code: in expectation
grad L_theta = grad E[f(x_0)] / (N D) over a buffer holding all N steps of each trajectory).
Every trained transition must be stochastic: a step with sigma = 0 has no log-prob, and as sigma -> 0
the estimator's variance grows like 1/sigma^2 (eta = 1, last step given min_sigma, as the authors).

Schedule (one `train()` step = one optimiser step): a cycle of n_critic critic steps, each sampling a
fresh batch of trajectories under a no-graph plan into a buffer and updating f and B, then n_generator
generator steps on minibatches of the buffer's transitions (advantages from the latest f and B); the
buffer is then emptied, so the policy gradient is on-policy (steps 2..n_generator reuse it, as the authors).

Deviations from the paper / authors' code, named:
- chain noise: the authors' toy code uses sigma_t = sqrt(beta_t) at every step (also the last); here the
  DDPM posterior sigma (eta = 1) and min_sigma = 1e-3 on the last step (the authors' image code does that);
- the toy code sums the log-prob over the 2 dimensions; here it is averaged (DESIGN; a constant factor);
- gen_batch = None uses every stored transition in one generator step (lower variance); the authors' toy
  draws one minibatch of `batch` transitions out of the n_critic * batch * N stored (gen_batch = 128);
- an optional WGAN-GP gradient penalty on the critic (the authors use no Lipschitz constraint);
- an optional moving average of the generator's weights (`ema`, Polyak averaging, updated at the step after
  each generator step) to sample from; the authors evaluate the raw weights (default: off).
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minialign.layers import MLPCritic, StepBaseline, gradient_penalty
from minialign.sampling import plan_none, sample, transition_log_prob
from minialign.schedule import Schedule, prev_timesteps
from minialign.methods.chain import chain_timesteps
from minialign.methods.sft_pg_config import SFTPGConfig


class SFTPG(nn.Module):
    """The three trained networks (denoiser, critic f, baseline B) and the stored trajectory buffer.

    denoiser:  a trainable copy of the pretrained eps-network (eps = denoiser(x_t, t, cond))
    timesteps: the N timesteps of the few-step chain (descending); data: real samples [M, ...]
    cond:      passed to the denoiser at every step (None: unconditional)
    Train with `train(model, loss_fn, TrainConfig(...), optimizer=model.optimizer())`, or `fit`.
    """

    def __init__(self, denoiser: nn.Module, schedule: Schedule, timesteps, data: torch.Tensor,
                 config: Optional[SFTPGConfig] = None, critic: Optional[nn.Module] = None,
                 baseline: Optional[nn.Module] = None, cond=None):
        super().__init__()
        self.config = cfg = config or SFTPGConfig()
        self.denoiser, self.schedule, self.cond = denoiser, schedule, cond
        self.timesteps = [int(t) for t in timesteps]
        self.register_buffer("data", data, persistent=False)
        dim = int(np.prod(data.shape[1:]))
        self.critic = critic if critic is not None else MLPCritic(dim)
        self.baseline = (baseline if baseline is not None else StepBaseline(dim, self.n_steps, cfg.baseline_hidden)
                         ) if cfg.baseline else None
        stored = cfg.n_critic * cfg.batch * self.n_steps
        if cfg.gen_batch is not None and cfg.gen_batch * cfg.n_generator > stored:
            raise ValueError(f"gen_batch: {cfg.n_generator} x {cfg.gen_batch} transitions per phase > the {stored} stored "
                             f"(n_critic x batch x steps)")
        # Polyak average of the generator (sample(..., ema=True)); a frozen copy, outside the optimiser
        self.ema = copy.deepcopy(denoiser).requires_grad_(False) if cfg.ema else None
        self._buffer: list = []  # one (states [N, B, ...], x_0 [B, ...]) per critic step of the current phase
        self._phase = None  # (transitions, permutation) while the generator steps of a phase run

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    @property
    def cycle(self) -> int:
        return self.config.n_critic + self.config.n_generator

    def is_generator_step(self, step: int) -> bool:
        return step % self.cycle >= self.config.n_critic

    def optimizer(self) -> torch.optim.Optimizer:
        """Adam with one param group per network (authors' lrs); per-group "max_norm" for train()'s clipping."""
        cfg = self.config
        gen = [p for p in self.denoiser.parameters() if p.requires_grad]
        groups = [{"params": gen, "lr": cfg.lr, "max_norm": cfg.max_norm},
                  {"params": list(self.critic.parameters()), "lr": cfg.critic_lr, "max_norm": cfg.critic_max_norm}]
        if self.baseline is not None:
            groups.append({"params": list(self.baseline.parameters()), "lr": cfg.baseline_lr,
                           "max_norm": cfg.critic_max_norm})
        if not groups[0]["params"]:
            raise ValueError("denoiser: no parameter requires grad (use copy.deepcopy(model).requires_grad_(True))")
        return torch.optim.Adam(groups)

    def sample(self, n: int, generator: Optional[torch.Generator] = None, plan=None, noises=None, x_T=None,
               ema: bool = False):
        """n trajectories of the trained chain: (x_0, Trajectory); no graph unless a plan asks for one.
        ema=True samples with the moving average of the weights instead (config.ema must be set)."""
        if ema and self.ema is None:
            raise ValueError("ema=True but this model keeps no moving average (set SFTPGConfig(ema=0.99))")
        if x_T is None:
            x_T = torch.randn((n, *self.data.shape[1:]), generator=generator, dtype=self.data.dtype).to(self.data.device)
        return sample(self.ema if ema else self.denoiser, self.schedule, x_T, self.timesteps, eta=self.config.eta,
                      plan=plan or plan_none(self.n_steps), cond=self.cond, generator=generator,
                      min_sigma=self.config.min_sigma, noises=noises, final_timestep=self.config.final_timestep)

    def advantage(self, states, step_index, final):
        """A = f(x_0) - B(x_i, i) [K], without grad (B = 0 when the baseline is off)."""
        with torch.no_grad():
            adv = self.critic(final)
            return adv - self.baseline(states, step_index) if self.baseline is not None else adv

    def policy_gradient_loss(self, states, next_states, step_index, final, advantage=None):
        """mean_k A_k * log p_theta(x_{i+1} | x_i)_k / D over K stored transitions (states [K, ...],
        step_index LongTensor [K], final = the x_0 each transition led to [K, ...]); graph to the denoiser."""
        adv = self.advantage(states, step_index, final) if advantage is None else advantage
        total = 0.0
        prev = prev_timesteps(self.timesteps, self.config.final_timestep)
        for i in step_index.unique().tolist():
            m = step_index == i
            s = prev[i]
            log_prob = transition_log_prob(self.denoiser, self.schedule, states[m], next_states[m], self.timesteps[i], s,
                                           self.config.eta, self.cond, self.config.min_sigma, reduce="mean")
            total = total + (adv[m] * log_prob).sum()
        return total / len(step_index), adv

    def critic_loss(self, real, states, x0, generator=None):
        """L_f + L_B (+ lambda reg, + GP) for one batch of trajectories: states [N, B, ...] (x_T .. x_1), x0 [B, ...]."""
        cfg = self.config
        f_real, f_gen = self.critic(real), self.critic(x0)
        ipm = f_gen.mean() - f_real.mean()
        loss, stats = -ipm, {"ipm": ipm.item(), "f_real": f_real.mean().item(), "f_gen": f_gen.mean().item()}
        if cfg.gradient_penalty:
            gp = gradient_penalty(self.critic, real, x0, generator)
            loss = loss + cfg.gradient_penalty * gp
            stats["gp"] = gp.item()
        if self.baseline is not None:
            n, b = states.shape[:2]
            pred = self.baseline(states.flatten(0, 1), torch.arange(n, device=x0.device).repeat_interleave(b))
            target = f_gen.repeat(n)
            baseline_mse = F.mse_loss(pred, target.detach())
            loss = loss + baseline_mse + cfg.baseline_reg * F.mse_loss(pred.detach(), target)
            stats["baseline_mse"] = baseline_mse.item()
        return loss, stats

    def loss(self, step: int, generator: torch.Generator):
        """One train() step: a critic step (sample, store, critic + baseline loss) or a generator step."""
        cfg = self.config
        if self.ema is not None and step > 0 and self.is_generator_step(step - 1):
            self._update_ema()  # fold in the weights the previous (generator) step produced
        if not self.is_generator_step(step):
            if step % self.cycle == 0:
                self._buffer, self._phase = [], None
            x0, traj = self.sample(cfg.batch, generator)
            states = torch.stack(traj.states[:-1])  # [N, B, ...]
            self._buffer.append((states, x0))
            real = self.data[torch.randint(len(self.data), (cfg.batch,), generator=generator).to(self.data.device)]
            loss, stats = self.critic_loss(real, states, x0, generator)
            return loss, {**stats, "reward": -stats["f_gen"]}
        j = step % self.cycle - cfg.n_critic
        if j == 0 or self._phase is None:
            if len(self._buffer) != cfg.n_critic:
                raise RuntimeError(f"step {step}: the trajectory buffer holds {len(self._buffer)} batches, expected "
                                   f"{cfg.n_critic} (a generator step must follow its n_critic critic steps)")
            n = self.n_steps
            states = torch.cat([s for s, _ in self._buffer], 1)  # [N, n_critic * B, ...]
            x0 = torch.cat([x for _, x in self._buffer])
            nxt = torch.cat([states[1:], x0[None]])
            k = states.shape[1]
            step_index = torch.arange(n).repeat_interleave(k).to(x0.device)
            final = x0.repeat(n, *[1] * (x0.dim() - 1))  # the x_0 each transition led to
            flat = (states.flatten(0, 1), nxt.flatten(0, 1), step_index, final)
            self._phase = (flat, torch.randperm(n * k, generator=generator))
        flat, perm = self._phase
        size = cfg.gen_batch or len(perm) // cfg.n_generator
        idx = perm[j * size:(j + 1) * size].to(self.data.device)
        loss, adv = self.policy_gradient_loss(*(t[idx] for t in flat))
        if j == cfg.n_generator - 1:
            self._buffer, self._phase = [], None
        return loss, {"pg_loss": loss.item(), "advantage_mean": adv.mean().item(), "advantage_std": adv.std().item()}

    @torch.no_grad()
    def _update_ema(self):
        for p_ema, p in zip(self.ema.parameters(), self.denoiser.parameters()):
            p_ema.lerp_(p, 1 - self.config.ema)

    # the buffer travels with the state dict, so train()'s checkpoints resume mid-cycle bit-exactly
    def get_extra_state(self):
        return {"buffer": self._buffer, "phase": self._phase}

    def set_extra_state(self, state):
        self._buffer, self._phase = state["buffer"], state["phase"]


def loss_fn(model: SFTPG, step: int, generator: torch.Generator):
    """The `loss_fn(model, step, generator)` of minialign.train.train, with the SFTPG module as the model."""
    return model.loss(step, generator)


class SFTPGLoss:
    """SFT-PG behind the method contract, `loss_fn(denoiser, step, generator)`: builds an SFTPG (critic, baseline,
    buffer) around the denoiser on first use; train() takes its `optimizer(model)` and checkpoints `state_dict()`."""

    def __init__(self, schedule, cfg: SFTPGConfig, data, timesteps, cond, init_seed: int = 0):
        self.schedule, self.cfg, self.data, self.timesteps, self.cond = schedule, cfg, data, timesteps, cond
        self.init_seed = init_seed
        self.module: Optional[SFTPG] = None

    def bind(self, model: nn.Module) -> SFTPG:
        if self.module is None or self.module.denoiser is not model:
            p = next(model.parameters())
            with torch.random.fork_rng():  # the critic's and baseline's init do not depend on when this runs
                torch.manual_seed(self.init_seed)
                self.module = SFTPG(model, self.schedule, self.timesteps, self.data.to(p.device, p.dtype), self.cfg,
                                    cond=self.cond).to(p.device, p.dtype)
        return self.module

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return self.bind(model).optimizer()

    def __call__(self, model, step: int, generator: torch.Generator):
        return self.bind(model).loss(step, generator)

    def state_dict(self) -> dict:
        return self.module.state_dict() if self.module is not None else {}

    def load_state_dict(self, state: dict):
        self.module.load_state_dict(state)  # train() calls optimizer(model) first, which binds the module


def make_loss(schedule, reward, cfg: SFTPGConfig, *, shape, cond=None, data=None, timesteps=None,
              init_seed: int = 0) -> SFTPGLoss:
    """The method contract for SFT-PG. Its "reward" is learned: -f(x_0), f a critic trained against `data`
    (real samples [M, *shape]), so `reward` is not used (pass None) and `data` is required.
    timesteps: the few-step chain (default: chain_timesteps(schedule, cfg), e.g. fastdpm_timesteps for images);
    init_seed: seeds the critic's and baseline's initialisation."""
    if data is None:
        raise ValueError("data: SFT-PG matches the data distribution (its reward is a critic trained against real "
                         "samples); pass data=[M, *shape]")
    if tuple(data.shape[1:]) != tuple(shape):
        raise ValueError(f"data must be [M, *shape] = [M, {tuple(shape)}], got {tuple(data.shape)}")
    ts = [int(t) for t in timesteps] if timesteps is not None else chain_timesteps(schedule, cfg)
    if len(ts) != cfg.n_steps:
        raise ValueError(f"timesteps: {len(ts)} given but cfg.n_steps = {cfg.n_steps}")
    return SFTPGLoss(schedule, cfg, data, ts, cond, init_seed)


def fit(model: SFTPG, critic_steps: int, seed: int = 0, callback=None, log_every: int = 1, progress: bool = True, **kw):
    """Run SFT-PG for `critic_steps` critic iterations (plus the interleaved generator steps) with train()."""
    from minialign.train import TrainConfig, train

    cycles = -(-critic_steps // model.config.n_critic)
    cfg = TrainConfig(steps=cycles * model.cycle, lr=model.config.lr, seed=seed, batch=model.config.batch,
                      grad_clip=None, log_every=log_every, progress=progress, **kw)
    return train(model, loss_fn, cfg, optimizer=model.optimizer(), callback=callback)
