"""The gradient laboratory: compare a method's gradient estimate with the exact gradient (2-D toy, float64).

    flat_grad(loss, params)                     one estimate as a flat vector
    estimates(name, model, ...)                 S independent estimates of a registered method's gradient [S, P]
    exact_gradient(model, ...)                  full backprop averaged over many samples, and its self-check
    estimator_stats(G, exact)                   cosine of each estimate and of their mean, noise fraction
    grad_norm(model, loss_fn)                   the norm of one gradient of a loss_fn
    sft_pg_gradient_samples(model, ...)         SFT-PG's policy gradient and the reparameterised one, projected

Used by the notebooks and the tests that check unbiasedness; none of this trains anything.
"""
from __future__ import annotations

import numpy as np
import torch

from minialign import methods as registry
from minialign.methods.sft_pg import SFTPG
from minialign.sampling import plan_full


def flat_grad(loss: torch.Tensor, params) -> torch.Tensor:
    """d loss / d params as one flat vector (zeros for a parameter the loss does not reach)."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def estimates(name: str, model, schedule, reward, shape, n: int, seed: int = 0, cond=None, **chain) -> torch.Tensor:
    """[n, P]: n independent gradient estimates of registered method `name` (its loss_fn evaluated once and
    differentiated, generator seeds seed..seed+n-1; a fresh loss_fn each time, so DDPO's is its first update)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for s in range(seed, seed + n):
        loss_fn, _ = registry.build(name, schedule, reward, shape=shape, cond=cond, **chain)
        out.append(flat_grad(loss_fn(model, 0, torch.Generator().manual_seed(s))[0], params))
    return torch.stack(out)


def exact_gradient(model, schedule, reward, shape, n_samples: int, chunk: int = 2048, seed: int = 10**6, cond=None,
                   **chain) -> tuple[torch.Tensor, float]:
    """(full-backprop gradient averaged over n_samples, cosine between the averages of its two halves): the
    reference "exact" gradient of E[r(x_0)] and a check of its own accuracy (near 1 when n_samples suffices)."""
    chunk = min(chunk, max(1, n_samples // 2))
    parts = estimates(registry.EXACT, model, schedule, reward, shape, max(2, n_samples // chunk), seed, cond,
                      **{**chain, "batch": chunk})
    half = len(parts) // 2
    return parts.mean(0), torch.cosine_similarity(parts[:half].mean(0), parts[half:].mean(0), 0).item()


def grad_norm(model, loss_fn, seed: int = 0) -> float:
    """|d loss / d theta| of one evaluation of loss_fn (generator seeded with `seed`)."""
    loss, _ = loss_fn(model, 0, torch.Generator().manual_seed(seed))
    return flat_grad(loss, [p for p in model.parameters() if p.requires_grad]).norm().item()


def estimator_stats(G: torch.Tensor, exact: torch.Tensor) -> dict:
    """G [S, P]: S independent estimates; exact [P]. Returns
    cos (mean over estimates of the cosine of ONE estimate to exact), cos_std, cos_of_mean (cosine of the mean of
    the S estimates: tends to 1 for an unbiased estimator as S grows), noise (E|g - mean|^2 / E|g|^2) and
    variance (trace of the per-estimate covariance, E|g - mean|^2)."""
    cos = torch.cosine_similarity(G, exact[None], 1)
    mean = G.mean(0)
    spread = ((G - mean) ** 2).sum(1).mean()
    return dict(cos=cos.mean().item(), cos_std=cos.std().item() if len(G) > 1 else 0.0,
                cos_of_mean=torch.cosine_similarity(mean, exact, 0).item(),
                noise=(spread / (G ** 2).sum(1).mean()).item(), variance=spread.item())


def sft_pg_gradient_samples(model: SFTPG, n_groups: int, group_size: int, directions: torch.Tensor,
                     generator: torch.Generator, baseline: bool = True) -> dict:
    """Projected estimates of grad_theta E[f(x_0)] (f and B fixed) on n_groups independent groups of trajectories.

    directions: [K, P] over the denoiser's trainable parameters. Returns {"pg": [n_groups, K]} SFT-PG's estimate
    (N D x the gradient of `policy_gradient_loss` over all N steps; B = 0 if baseline=False) and {"rp": ...} the
    reparameterised full-backprop gradient of mean f(x_0) on the same trajectories (same x_T and noises).
    Both are unbiased; var over groups x group_size is the variance per trajectory.
    """
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    n, dim = model.n_steps, int(np.prod(model.data.shape[1:]))
    flat = lambda loss: torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])  # noqa: E731
    out = {"pg": [], "rp": []}
    for _ in range(n_groups):
        x0, traj = model.sample(group_size, generator)
        idx = torch.arange(n, device=x0.device).repeat_interleave(group_size)
        final = x0.repeat(n, *[1] * (x0.dim() - 1))
        adv = None if baseline else model.critic(final).detach()  # B = 0
        loss, _ = model.policy_gradient_loss(torch.cat(traj.states[:-1]), torch.cat(traj.states[1:]), idx, final, adv)
        out["pg"].append(directions @ flat(loss) * n * dim)
        x_rp, _ = model.sample(group_size, plan=plan_full(n), noises=traj.noises,
                               x_T=traj.states[0])
        out["rp"].append(directions @ flat(model.critic(x_rp).mean()))
    return {k: torch.stack(v) for k, v in out.items()}
