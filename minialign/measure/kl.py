"""KL to the pretrained model: a regulariser any registered method can carry in the arena (arena.run(kl_coef=...)).

Each sampling step is a Gaussian policy N(mu_theta(x_t), sigma_t^2 I). At one state x_t the KL between the tuned
and the pretrained step (the same sigma_t) is

    KL_t(x_t) = |mu_theta(x_t) - mu_ref(x_t)|^2 / (2 sigma_t^2) = b_t^2 |eps_theta(x_t, t) - eps_ref(x_t, t)|^2 / (2 sigma_t^2)

summed over dimensions (mu = a_t x_t + b_t eps: the a_t x_t terms cancel). The penalty is the chain's total,
E_x sum_t KL_t(x_t), and the loss becomes loss + coef * penalty.

Where the states come from (named deviation from an on-policy KL): a POOL of states of the pretrained model's chain
(the task's evaluation chain, DDPM noise eta = 1, `pool` samples from fixed noise, drawn once when the regulariser is
built, outside the counted budget, like the arena's evaluation chain), so the regulariser says "stay close to the
pretrained model where the pretrained model goes", and its cost per training step is constant: one network call with
graph and one pretrained call on `batch` rows, at one step drawn uniformly (see below). Its draws come from its own generator, seeded by the train() step, so the method's
own random stream is unchanged.

sigma_t: the DDPM step's (eta = 1) whatever eta the method trains with: a deterministic chain has sigma = 0 and no
finite KL. The last step (to t = 0 / -1) has sigma = 0 even at eta = 1 and is left out: the sum runs over the other
N - 1 steps, estimated unbiasedly by (N - 1) KL_m at one uniformly drawn m.
"""
from __future__ import annotations

import copy

import torch

from minialign.sampling import gaussian_kl, sample
from minialign.schedule import prev_timesteps, step_coefficients


def step_kl(model, reference, schedule, x_t, t: int, s: int, cond=None) -> torch.Tensor:
    """[B]: |mu_theta(x_t) - mu_ref(x_t)|^2 / (2 sigma^2) of the eta = 1 step t -> s (graph through model only)."""
    c = step_coefficients(schedule, t, s, 1.0)
    if not c.sigma > 0:
        raise ValueError(f"t={t} -> s={s}: the DDPM step has sigma = 0 (the last step): no finite KL")
    tb = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
    with torch.no_grad():
        eps_ref = reference(x_t, tb, cond)
    return gaussian_kl(c.b * model(x_t, tb, cond), c.b * eps_ref, c.sigma)  # the a_t x_t parts of the means cancel


class KLRegularised:
    """loss_fn + coef * (N - 1) KL_m on `batch` pooled states at a uniformly drawn stochastic step m (see above);
    stats gain "kl" (the estimate of the chain's total). Forwards a method's own optimizer/state_dict."""

    def __init__(self, loss_fn, base, schedule, ts, coef: float, *, shape, batch: int, pool: int = 256, cond=None,
                 final_timestep: int = -1, seed: int = 4321):
        if not coef >= 0:
            raise ValueError(f"kl coef must be >= 0, got {coef}")
        if not 1 <= batch <= pool:
            raise ValueError(f"batch must be in [1, pool={pool}], got {batch}")
        self.loss_fn, self.schedule, self.coef, self.batch, self.seed = loss_fn, schedule, coef, batch, seed
        self.reference = copy.deepcopy(base).eval().requires_grad_(False)
        self.ts, self.prev = list(ts), prev_timesteps(list(ts), final_timestep)
        self.steps = [m for m in range(len(self.ts)) if step_coefficients(schedule, self.ts[m], self.prev[m], 1.0).sigma > 0]
        if not self.steps:
            raise ValueError(f"timesteps {self.ts}: no step with sigma > 0 at eta = 1")
        p = next(base.parameters())
        x_T = torch.randn((pool, *shape), generator=torch.Generator().manual_seed(seed), dtype=p.dtype).to(p.device)
        self.cond = cond
        with torch.no_grad():  # the pool: [N + 1, pool, ...] states of the pretrained DDPM chain
            _, traj = sample(self.reference, schedule, x_T, self.ts, 1.0, cond=cond, final_timestep=final_timestep,
                             generator=torch.Generator().manual_seed(seed + 1))
        self.states = torch.stack(traj.states)
        for attr in {"optimizer", "state_dict", "load_state_dict"} & set(dir(loss_fn)):
            setattr(self, attr, getattr(loss_fn, attr))

    def __call__(self, model, step: int, generator):
        loss, stats = self.loss_fn(model, step, generator)
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        m = self.steps[int(torch.randint(len(self.steps), (1,), generator=g))]
        rows = torch.randperm(self.states.shape[1], generator=g)[:self.batch].to(self.states.device)
        c = None if self.cond is None else self.cond[rows]
        kl = len(self.steps) * step_kl(model, self.reference, self.schedule, self.states[m][rows], self.ts[m],
                                       self.prev[m], c).mean()
        return loss + self.coef * kl, {**stats, "kl": kl.item()}


def sweep(method_names, task, coefs, **arena_kwargs) -> dict:
    """One arena run per KL coefficient (the same methods, budget and seeds): {"coefs", "results"} for
    arena_report.plot_kl's Pareto points."""
    from minialign.measure import arena

    return {"coefs": list(coefs), "results": [{k: v for k, v in arena.run(method_names, task, kl_coef=c,
                                                                            **arena_kwargs).items() if k != "models"}
                                              for c in coefs]}


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    from minialign.measure.arena_report import format_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--coefs", type=float, nargs="+", required=True)
    p.add_argument("--flops", type=float, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--evals", type=int, default=4)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    out = sweep(a.methods, a.task, a.coefs, flops=a.flops, seeds=a.seeds, evals=a.evals)
    out["command"] = "python -m minialign.measure.kl " + " ".join(argv if argv is not None else sys.argv[1:])
    for c, r in zip(out["coefs"], out["results"]):
        print(f"kl_coef {c}\n{format_table(r)}")
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
