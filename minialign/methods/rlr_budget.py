"""RLR's memory budget: the sub-chain length h* that a budget B allows (Ren et al. 2025, Sec. on memory).

With T sampling steps, the last one FO, h steps of the HO sub-chain holding a backprop graph each (B_h) and
the other T - 1 - h steps zeroth-order (B_z each), the memory is h B_h + (T - 1 - h) B_z <= B, so

    h* = floor((B - B_z (T - 1)) / (B_h - B_z))          capped at T - 1

and, with the measured variances V_h (HO) and V_z (ZO) of one step's estimator, the paper's variance bound

    h* <= floor(T V_z / (2 (V_z - V_h)) - 1)             (applied only when V_h and V_z are given; the result says)

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
from typing import Optional

import torch

from minialign.measure.memory import peak_saved_bytes, saved_bytes  # noqa: F401  (peak_saved_bytes: re-exported)
from minialign.sampling import plan_full, sample, transition_log_prob
from minialign.schedule import prev_timesteps, timesteps


class HStar(int):
    """h* as an int, with how it was bounded: memory_bound, variance_bound (None when V_h, V_z were not given),
    variance_bound_applied, and a sentence saying which bound decided (str(h) is the number, repr the sentence)."""

    def __new__(cls, value: int, memory_bound: int, variance_bound=None):
        h = super().__new__(cls, value)
        h.memory_bound, h.variance_bound = memory_bound, variance_bound
        h.variance_bound_applied = variance_bound is not None
        if variance_bound is None:
            h.note = (f"h* = {value} from the memory bound only; the variance bound was NOT applied "
                      f"(give v_h and v_z, e.g. measured with minialign.measure.lab)")
        else:
            h.note = f"h* = {value} = min(memory bound {memory_bound}, variance bound {variance_bound})"
        return h

    def __repr__(self):
        return f"HStar({self.note})"

    def __str__(self):
        return str(int(self))


def h_star(budget: float, b_h: float, b_z: float, n_steps: int, v_h: Optional[float] = None,
           v_z: Optional[float] = None) -> HStar:
    """The paper's h*: the memory bound floor((B - B_z (T - 1)) / (B_h - B_z)), capped at T - 1, and, given the
    variances V_h of the HO and V_z of the ZO estimator (one step, the same units), also the variance bound
    h* <= floor(T V_z / (2 (V_z - V_h)) - 1) (it needs V_z > V_h >= 0). Without V_h and V_z the result says the
    variance bound was not applied (HStar.variance_bound_applied False). Units of B, B_h, B_z: any, the same."""
    if not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an int >= 2 (one FO step and at least one more), got {n_steps!r}")
    if not b_z >= 0 or not b_h > b_z:
        raise ValueError(f"b_h must exceed b_z >= 0 (a backprop step must cost more than a ZO step), got b_h={b_h}, b_z={b_z}")
    floor = b_z * (n_steps - 1)
    if not budget >= floor:
        raise ValueError(f"budget {budget} is below one full chain of perturbation steps, B_z (T - 1) = {b_z} x "
                         f"{n_steps - 1} = {floor}: no h fits; give budget >= {floor}")
    memory = min(math.floor((budget - floor) / (b_h - b_z)), n_steps - 1)
    if v_h is None and v_z is None:
        return HStar(memory, memory)
    if v_h is None or v_z is None or not (0 <= v_h < v_z and math.isfinite(v_z)):
        raise ValueError(f"v_h and v_z must both be given with 0 <= v_h < v_z finite (the paper's bound assumes the HO "
                         f"estimator is less noisy than the ZO one), got v_h={v_h}, v_z={v_z}")
    variance = math.floor(n_steps * v_z / (2 * (v_z - v_h)) - 1)
    return HStar(min(memory, variance), memory, variance)


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
