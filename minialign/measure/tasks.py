"""Reward tasks the arena ranks methods on: a model, a reward, the conditioning, the chain, and why it ranks.

A task that every method maxes out within the budget ranks nothing (notebook 02's p(3) did: all six baselines
reached p = 1.000 within seconds). The tasks below were picked by measurement (`python -m minialign.arena
--task NAME`, numbers in the README): the pretrained model is far from the best reward any method reached, and
no method reached the reward's ceiling within the cpu budget.

    digit3          p(3) from the classifier, unconditional digits (the EASY task: saturates; kept as a check)
    digit3_tempered p(3) with the classifier's logits divided by T = 20 on images clamped to [-1, 1]: the reward
                    keeps rising with the classifier's margin long after the 3 is recognisable (as learned
                    aesthetic scores do), and out-of-range pixels buy nothing. Measured: with T = 4 and T = 10,
                    full backprop reached 0.98-1.00 within 16-40 steps; the margin it reached gives ~0.7 at T = 20
    digit_plus_one  class-conditional digits told "c" must draw c + 1 (mod 10): ten mappings to learn at once;
                    p(c + 1) itself starts at ~2e-5, where its gradient vanishes (no method moved in smoke runs);
                    log p(c + 1) averages outliers down to -35 and blew full backprop up (drift 7); so the same
                    tempered probability (T = 20, clamped) as above
    ring_centre     the 2-D ring of 8 Gaussians must move its mass into the empty centre: r = -distance to a
                    disc of radius 0.15 at the origin (EASY: saturates; the exact gradient is cheap)
    bias            the BIAS task (issue 18): the 2-D ring model frozen, eps = net(x_t, t) + b[step] with the 20 x 2
                    per-step biases b the only trainable parameters, reward log N(x; mode 0, 0.08^2) on a 20-step DDPM
                    chain. Parameters local to steps and a reward decided early: the last steps hold 2.7% of |grad|^2,
                    so a truncated gradient misses most of it (cosine of the mean to the exact gradient, measured in
                    the issue: DRaFT-1 0.088, DRaFT-K 0.162, full backprop 0.999, RLR 0.997, DDPO 0.993)

Every method is scored on the task's ONE evaluation chain (`eval_chain`: its steps, spacing and final timestep, eta
= eval_eta), whatever chain it trains on. `ranks=False` marks a task that saturates: a check, left out of rankings.
`drift_limit` (sliced W2 to the pretrained samples) is the drift above which a seed counts as diverged (None: only
non-finite values do). Digits tasks: DIGITS_DRIFT_LIMIT = 16, a strict bound on the sliced W2 of two sets of in-range
8x8 images (each unit projection |theta . (x - y)| <= |x - y| <= 2 sqrt(64); the furthest in-range sets, all +1
against all -1, measure about 2): a drift above it needs samples far outside the data's [-1, 1], which the clamped
rewards and the gold score cannot see.

Quality the methods do not optimise (every digits task, `quality`): "gold" = the mean probability the GOLD
classifier (data/gold: an MLP on another split, `python -m minialign.toy.pretrain gold`, independent of the reward's
CNN) gives the task's target digit, on the images clamped to [-1, 1] (untempered); feature_mmd = the squared MMD
(RBF, median-heuristic bandwidths; metrics.mmd_rbf) between the gold classifier's features of the samples and of the
real digits of the target class (lower is better; ~0 for real digits of that class).

Drift (every task): sliced W2 between the tuned model's samples and the pretrained model's samples from the
same noise and conditioning (flattened), so 0 means "unchanged".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from minialign.rewards import Reward, classifier_reward, component_log_density, target_region


def random_labels(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Conditioning of a training batch: uniform digit labels [batch] (drawn from the method's generator)."""
    return torch.randint(10, (batch,), generator=generator)


DIGITS_DRIFT_LIMIT = 16.0  # 2 * sqrt(64): no two sets of in-range 8x8 images are further apart (see above)


@dataclass(frozen=True)
class Task:
    name: str
    label: str                         # a human name for tables and figures
    model: str                         # shipped checkpoint (minialign.toy.store)
    reward: Callable[[], Reward]       # builds the reward (lazily: the classifier loads from data/)
    shape: tuple
    conditional: bool = False          # random labels in training, labels 0..9 cycled in evaluation
    n_steps: int = 20                  # the chain every method trains and is evaluated on (trailing spacing)
    batch: int = 32
    lr: float = 1e-4
    eval_batch: int = 128
    ceiling: Optional[float] = None    # the reward's maximum, where one exists
    why: str = ""
    chain: dict = field(default_factory=dict)  # further ChainConfig fields shared by every method
    eval_eta: float = 0.0              # the evaluation chain's eta (the same for every method)
    drift_limit: Optional[float] = None  # drift above which a seed is flagged as diverged
    ranks: bool = True                 # False: saturates, a check only (no ranking is drawn from it)
    quality: Optional[Callable] = None  # quality() -> fn(x, cond) -> {name: number}: scores the reward does not see

    def eval_chain(self) -> dict:
        """The one chain every method is scored on: n_steps, eta, spacing, offset, final_timestep."""
        c = {"spacing": "trailing", "offset": 0, "final_timestep": -1, **self.chain}
        return {"n_steps": self.n_steps, "eta": self.eval_eta, "spacing": c["spacing"], "offset": c["offset"],
                "final_timestep": c["final_timestep"]}

    def load(self, device: str = "cpu"):
        """(pretrained model, frozen, eval mode; schedule)."""
        from minialign.toy import store

        model, schedule, _ = store.load(self.model)
        return model.to(device).eval().requires_grad_(False), schedule

    def train_cond(self):
        return random_labels if self.conditional else None

    def eval_cond(self, n: int, device: str = "cpu"):
        return torch.arange(n, device=device) % 10 if self.conditional else None


_PIPES: dict = {}  # (model folder, LoRA rank) -> the loaded pipeline with its adapter, shared by an SDTask's calls


@dataclass(frozen=True)
class SDTask(Task):
    """A task on a diffusers pipeline (minialign.sd): the model is the pipeline's UNet with a LoRA adapter behind
    classifier-free guidance (sd.LoRADenoiser: only the LoRA trains), the sampler's space its latents, the reward
    `image_reward()` on the decoded image, the conditioning the embeddings of `prompts` cycled over the batch.
    `model` is a save_pretrained folder (default: the shipped mini-SD)."""

    prompts: tuple = ()
    image_reward: Optional[Callable] = None
    guidance: float = 3.0
    lora_rank: int = 4

    def __post_init__(self):
        if not self.prompts or self.image_reward is None:
            raise ValueError(f"SDTask {self.name!r} needs prompts and an image_reward")
        object.__setattr__(self, "reward", self._reward)

    def pipeline(self):
        from minialign.sd import add_lora, load_pipeline
        from minialign.sd.mini import DEFAULT_OUT

        key = (self.model, self.lora_rank)
        if key not in _PIPES:
            pipe = load_pipeline(str(DEFAULT_OUT) if self.model == "mini_sd" else self.model)
            add_lora(pipe, rank=self.lora_rank)
            _PIPES[key] = pipe
        return _PIPES[key]

    def _reward(self) -> Reward:
        from minialign.sd import latent_reward
        return latent_reward(self.pipeline(), self.image_reward())

    def load(self, device: str = "cpu"):
        from minialign.sd import schedule_from
        from minialign.sd.adapter import LoRADenoiser

        pipe = self.pipeline()
        return LoRADenoiser(pipe, self.guidance).to(device).eval().requires_grad_(False), schedule_from(pipe)

    def _cond(self, n: int, device: str = "cpu"):
        from minialign.sd.build import batch_cond

        return batch_cond(self.pipeline(), list(self.prompts), n).to(device)

    def train_cond(self):
        return lambda batch, generator: self._cond(batch)

    def eval_cond(self, n: int, device: str = "cpu"):
        return self._cond(n, device)


class StepBias(torch.nn.Module):
    """eps = net(x_t, t, cond) + b[step(t)]: a frozen denoiser plus one additive bias per chain step, b [N, dim]
    (zero: the pretrained model). step(t) is looked up PER ROW from t [B] (RLR puts several timesteps into one call);
    a t that is not a step of the chain is refused. requires_grad_ reaches b only: b is all that trains."""

    def __init__(self, net: torch.nn.Module, timesteps, dim: int):
        super().__init__()
        self.net, self.timesteps = net.requires_grad_(False), [int(t) for t in timesteps]
        self.bias = torch.nn.Parameter(torch.zeros(len(self.timesteps), dim, dtype=next(net.parameters()).dtype))
        lookup = torch.full((max(self.timesteps) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(self.timesteps)] = torch.arange(len(self.timesteps))
        self.register_buffer("step_of", lookup)

    def forward(self, x, t, cond=None):
        step = self.step_of[t.clamp(0, len(self.step_of) - 1)]
        off = (step < 0) | (t >= len(self.step_of)) | (t < 0)
        if off.any():
            raise ValueError(f"t: timesteps {sorted(set(t[off].tolist()))} are not steps of this model's chain "
                             f"{self.timesteps}")
        return self.net(x, t, cond) + self.bias[step]

    def requires_grad_(self, requires_grad: bool = True):
        self.net.requires_grad_(False)
        self.bias.requires_grad_(requires_grad)
        return self


@dataclass(frozen=True)
class BiasTask(Task):
    """A task whose model is StepBias(the shipped `model`, the evaluation chain's timesteps)."""

    def load(self, device: str = "cpu"):
        from minialign.schedule import timesteps

        net, schedule = super().load(device)
        c = self.eval_chain()
        ts = timesteps(schedule.T, c["n_steps"], c["spacing"], c["offset"])
        return StepBias(net, ts, self.shape[0]).to(device).eval().requires_grad_(False), schedule


def digit_quality(target: Optional[int] = None, label_offset: int = 0):
    """quality() for a digits task (see the module docstring): fn(x [B, 1, 8, 8], cond) -> {"gold", "feature_mmd"}.
    target None: each row's target is (cond + label_offset) mod 10, the reference every real digit of those classes."""
    def build():
        from minialign.metrics import mmd_rbf
        from minialign.toy import data, store

        gold = store.load("gold")[0]
        real, labels = data.load_digits_tensors("all")

        @torch.no_grad()
        def fn(x, cond=None):
            if target is None and cond is None:
                raise ValueError("digit_quality(target=None) scores images against their labels: pass cond [B]")
            want = torch.full((len(x),), int(target)) if target is not None else (cond.cpu() + label_offset) % 10
            x = x.detach().cpu().float().clamp(-1, 1)
            g = gold.to(torch.float32)
            p = g(x).softmax(1).gather(1, want[:, None]).squeeze(1)
            ref = real[torch.isin(labels, want.unique())]
            return {"gold": p.mean().item(), "feature_mmd": mmd_rbf(g.features(x), g.features(ref), bandwidths=None)}
        return fn
    return build


def _brightness():
    from minialign.rewards.image import brightness

    return brightness()


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("digit3", "p(3), digits (easy)", "digits", lambda: classifier_reward(3), (1, 8, 8), ceiling=1.0, ranks=False,
         drift_limit=DIGITS_DRIFT_LIMIT,
         quality=digit_quality(3),
         why="saturates: every baseline reaches p = 1.000 in seconds (notebook 02); a sanity check, ranks nothing"),
    Task("digit3_tempered", "tempered p(3), clamped", "digits",
         lambda: classifier_reward(3, temperature=20.0, clamp=True), (1, 8, 8), ceiling=1.0, quality=digit_quality(3),
         drift_limit=DIGITS_DRIFT_LIMIT,
         why="a recognisable 3 scores ~0.5; the reward keeps rising with the classifier's margin on in-range pixels"),
    Task("digit_plus_one", "draw label + 1", "digits",
         lambda: classifier_reward(None, label_offset=1, temperature=20.0, clamp=True), (1, 8, 8), conditional=True,
         quality=digit_quality(None, label_offset=1), drift_limit=DIGITS_DRIFT_LIMIT,
         ceiling=1.0, why="ten label-to-digit mappings to relearn at once; the pretrained model draws its label so "
         "well that p(label + 1) ~ 2e-5, where a probability's gradient vanishes: tempered (T = 20), it starts near 0.1"),
    Task("ring_centre", "2-D: into the ring's centre (easy)", "gmm", lambda: target_region((0.0, 0.0), radius=0.15),
         (2,), batch=64, lr=1e-3, ceiling=0.0, ranks=False,
         why="saturates: the pathwise methods put every point in the disc (reward 0) within ~30 steps, DDPO "
             "gets to -0.58 (8 s each, one seed); a 2-D check whose exact gradient is cheap"),
    BiasTask("bias", "2-D: one mode, per-step biases (DDPM)", "gmm", lambda: component_log_density(0), (2,),
             batch=64, lr=1e-2, eval_batch=512, ceiling=-2 * math.log(0.08) - math.log(2 * math.pi),
             chain=dict(eta=1.0), eval_eta=1.0, drift_limit=3.0,
             why="parameters local to steps, a reward decided early: truncated gradients miss most of the gradient "
                 "(issue 18, one seed, 600 AdamW 1e-2 steps: reward / share within 0.3 of the mode, pretrained "
                 "-154 / 0.12; full BP -5.0 / 0.75, RLR -7.6 / 0.72, DDPO -7.2 / 0.72, DRaFT-K -56 / 0.006, DRaFT-1 "
                 "-118 / 0.08). drift_limit 3: the ring has radius 1, moving all of it onto one mode drifts ~1"),
    SDTask("mini_sd_brightness", "mini-SD: brightness (LoRA)", "mini_sd", None, (4, 8, 8), n_steps=10, batch=4, lr=3e-3,
           eval_batch=16, chain=dict(spacing="leading", offset=1),
           prompts=("a red digit seven", "a blue digit four", "a green digit three", "a yellow digit zero"),
           image_reward=_brightness,
           why="Stable Diffusion's path: the arena on a diffusers pipeline; brightness of 16x16 images can be hacked "
               "(notebook 06), so it shows what each method does to the samples as much as how fast it climbs"),
]}


def get(name) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]
