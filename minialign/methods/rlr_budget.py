"""RLR's memory budget: the sub-chain length h* that a budget B allows (Ren et al. 2025, Sec. on memory).

With T sampling steps, the last one FO, h steps of the HO sub-chain holding a backprop graph each (B_h) and
the other T - 1 - h steps zeroth-order (B_z each), the memory is h B_h + (T - 1 - h) B_z <= B, so

    h* = floor((B - B_z (T - 1)) / (B_h - B_z))          capped at T - 1

(the authors: B_h = 8 GB, B_z = 0.24 GB on SD1.4, T = 50, so h* = 2 for 30-40 GB). A budget below one full
chain of perturbation steps, B < B_z (T - 1), allows no RLR at all and is refused.

`measure` takes B_h and B_z on the current model with bench.saved_bytes (bytes autograd saves for backward,
the parameters left out), for one step at the middle of the chain:

    b_h           one graph step of the HO sub-chain: network call with graph to its input and the parameters
    b_z_inherent  one inherent-noise ZO step: log N(x_s; mu_theta(sg[x_t]), sigma^2), graph to the parameters
                  only. It saves about as much as b_h: in this implementation the inherent-noise ZO is no cheaper
                  in memory than HO, so h* is really a choice for the perturbation ZO
    b_z_perturb   one perturbation step: a no-grad network call with theta + delta (delta regenerated from a
                  seed): nothing is saved for backward (0). The paper's B_z > 0 counts inference memory that
                  saved-for-backward bytes do not see.

With zo_chunk >= 1 (rlr.py's default) the inherent-noise ZO steps are backpropagated inside the loss, a chunk
at a time, so their memory does not add up over the chain; bench.saved_bytes sums every tensor saved during a
call, so it still counts them all. `peak_saved_bytes` counts what is alive at once (the peak of saved tensors
not yet released, each storage once), which is what a memory budget is about.
"""
from __future__ import annotations

import math

import torch

from minialign.measure.bench import peak_saved_bytes, saved_bytes  # noqa: F401  (peak_saved_bytes: re-exported)
from minialign.sampling import plan_full, sample, transition_log_prob
from minialign.schedule import prev_timesteps, timesteps


def h_star(budget: float, b_h: float, b_z: float, n_steps: int) -> int:
    """The paper's h* = floor((B - B_z (T - 1)) / (B_h - B_z)), capped at T - 1. Units: any, the same for all."""
    if not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an int >= 2 (one FO step and at least one more), got {n_steps!r}")
    if not b_z >= 0 or not b_h > b_z:
        raise ValueError(f"b_h must exceed b_z >= 0 (a backprop step must cost more than a ZO step), got b_h={b_h}, b_z={b_z}")
    floor = b_z * (n_steps - 1)
    if not budget >= floor:
        raise ValueError(f"budget {budget} is below one full chain of perturbation steps, B_z (T - 1) = {b_z} x "
                         f"{n_steps - 1} = {floor}: no h fits; give budget >= {floor}")
    return min(math.floor((budget - floor) / (b_h - b_z)), n_steps - 1)


def measure(model, schedule, *, shape, batch: int = 32, n_steps: int = 50, eta: float = 1.0, cond=None) -> dict:
    """{b_h, b_z_inherent, b_z_perturb} in bytes, one step at the middle of an n_steps trailing chain (see above)."""
    p = next(model.parameters())
    params = list(model.parameters())
    ts = timesteps(schedule.T, n_steps, "trailing")
    i = n_steps // 2
    t, s = ts[i], prev_timesteps(ts)[i]
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn((batch, *shape), generator=g, dtype=p.dtype).to(p.device)
    x_s = torch.randn((batch, *shape), generator=g, dtype=p.dtype).to(p.device)
    x_in = x_t.clone().requires_grad_(True)  # mid-chain: the input carries the earlier steps' graph

    def backprop_step():
        return sample(model, schedule, x_in, [t], eta, plan_full(1), cond=cond, final_timestep=s,
                      noises=[torch.zeros_like(x_t)])[0]

    def inherent_step():
        return transition_log_prob(model, schedule, x_t, x_s, t, s, eta, cond)

    def perturb_step():
        with torch.no_grad():
            return model(x_t, torch.full((batch,), t, dtype=torch.long, device=p.device), cond)

    return {"b_h": saved_bytes(backprop_step, exclude=params), "b_z_inherent": saved_bytes(inherent_step, exclude=params),
            "b_z_perturb": saved_bytes(perturb_step, exclude=params)}
