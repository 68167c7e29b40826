"""ShortFT's shortcut: a few-step, trajectory-preserving student distilled from a pretrained base model.

    python -m minialign.methods.shortcut gmm        # 2-D ring of Gaussians (T = 1000): data/shortcut_gmm.*
    python -m minialign.methods.shortcut digits     # 8x8 digits, class-conditional UNet: data/shortcut_digits.*

Segment-wise regression onto the teacher's own DDIM (probability-flow) trajectory. For each segment
(t_a -> t_b) the teacher is the base model's multi-step DDIM (eta = 0) along a chain grid, whose states
at t_a and t_b come from ONE sampled trajectory; the student eps_phi (a copy of the base network, all of
it fine-tuned) must land there in ONE DDIM step:

    x_b^teacher = DDIM_theta0(x_a; t_a -> ... -> t_b)                    (states of the same trajectory)
    x_b^phi     = a x_a + b eps_phi(x_a, t_a, c),    a = sqrt(abar_b / abar_a),  b = DDIM's b (schedule.py)
    L(phi)      = E_{segment, x_T, c} || eps_phi(x_a, t_a, c) - (x_b^teacher - a x_a) / b ||^2

(an x-space regression weighted by 1 / b^2 per segment). The student is told the segment only through t_a,
so the distilled jumps form a map t_a -> t_b (`Shortcut.segments`): one checkpoint serves every layout whose
jumps it holds. Distilled here: ShortFT's default jumps on the arena's chain (20 steps, trailing), on bench.py's
(50 steps, trailing) and on the paper's (50 steps, leading, offset 1), and a 4-step sampler on the paper's grid
(981 -> 741 -> 501 -> 261 -> 0).

Fidelity is measured on held-out trajectories, per segment: rms over samples and dimensions of
(shortcut jump - teacher endpoint), next to the base's own single DDIM step over the same segment.
Deviations: Hyper-SD (the paper's shortcut) is trajectory-segmented consistency distillation with
adversarial and human-feedback terms; this is a plain regression, trained on on-trajectory inputs only.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start
from minialign.methods.shortft import PAPER_ANCHORS, jumps, layout
from minialign.rewards.base import require_differentiable, reward_with_graph
from minialign.sampling import plan_full, plan_none, sample
from minialign.schedule import step_coefficients
from minialign.toy import store

# the chains whose ShortFT jumps are distilled: the arena's tasks, bench.py's 50 steps, the paper's SD chain
GRIDS = {"arena": ChainConfig(n_steps=20), "bench": ChainConfig(n_steps=50),
         "paper": ChainConfig(n_steps=50, spacing="leading", offset=1)}
FOUR_STEP = (981, 741, 501, 261)  # on the paper grid; the last jump lands on the data
RECIPES = {  # pool: teacher trajectories per grid; steps, batch, lr of the student's Adam
    "gmm": dict(pool=4096, held_out=2048, steps=3000, batch=512, lr=3e-4),
    "swissroll": dict(pool=4096, held_out=2048, steps=3000, batch=512, lr=3e-4),
    "digits": dict(pool=1024, held_out=256, steps=800, batch=96, lr=2e-4),
}


class Shortcut(torch.nn.Module):
    """A frozen student with the denoiser signature; valid only at its segments' start times t_a."""

    def __init__(self, net: torch.nn.Module, segments: dict, meta: dict | None = None):
        super().__init__()
        self.net, self.segments, self.meta = net, {int(a): int(b) for a, b in segments.items()}, meta or {}

    def forward(self, x, t, cond=None):
        bad = sorted(set(t.unique().tolist()) - set(self.segments))
        if bad:
            raise ValueError(f"t: the shortcut has no segment starting at {bad}; distilled: "
                             f"{sorted(self.segments.items(), reverse=True)}")
        return self.net(x, t, cond)


class ExactJump(torch.nn.Module):
    """The teacher as a shortcut: one DDIM step of it from t_a to segments[t_a] is exactly the base's
    multi-step DDIM along `grid`, eps_equiv = (DDIM_base(x_a; t_a -> t_b) - a x_a) / b. The base is held,
    not registered: ExactJump has no parameters, and the graph to the base's parameters is whatever they
    carry (so with the trained model itself, ShortFT becomes full backprop: the test oracle)."""

    def __init__(self, base, schedule, grid, segments: dict):
        super().__init__()
        object.__setattr__(self, "base", base)
        self.schedule, self.grid, self.segments = schedule, [int(u) for u in grid], dict(segments)

    def forward(self, x, t, cond=None):
        t_a = int(t[0])
        t_b = self.segments[t_a]
        steps = [u for u in self.grid if t_b < u <= t_a]
        x_b, _ = sample(self.base, self.schedule, x, steps, 0.0, plan_full(len(steps)), cond=cond, final_timestep=t_b)
        c = step_coefficients(self.schedule, t_a, t_b, 0.0)
        return (x_b - c.a * x) / c.b


def segments_for(schedule) -> list[tuple[int, int, str]]:
    """(t_a, t_b, grid name) of every distilled segment: ShortFT's jumps on each grid, then the 4-step sampler."""
    segs = {}
    for g, cfg in GRIDS.items():
        for a, b in jumps(layout(chain_timesteps(schedule, cfg), PAPER_ANCHORS, schedule.T)):
            segs.setdefault(a, (b, g))
    for a, b in zip(FOUR_STEP, FOUR_STEP[1:] + (-1,)):
        if a in segs and segs[a][0] != b:
            raise ValueError(f"segment start t_a={a} would need two ends ({segs[a][0]} and {b})")
        segs.setdefault(a, (b, "paper"))
    return [(a, b, g) for a, (b, g) in sorted(segs.items(), reverse=True)]


@torch.no_grad()
def teacher_states(base, schedule, grid, x_T, cond=None, batch: int = 512, final_timestep: int = -1) -> dict:
    """{t: x_t [N, ...]} along the base's DDIM chain over `grid` from x_T (t = final_timestep: the chain's end)."""
    out = {}
    for i in range(0, len(x_T), batch):
        c = None if cond is None else cond[i:i + batch]
        _, traj = sample(base, schedule, x_T[i:i + batch], grid, 0.0, plan_none(len(grid)), cond=c,
                         final_timestep=final_timestep)
        for t, x in zip(list(grid) + [final_timestep], traj.states):
            out.setdefault(t, []).append(x)
    return {t: torch.cat(v) for t, v in out.items()}


def _draw(n, shape, conditional, g):
    x_T = torch.randn((n, *shape), generator=g)
    cond = torch.where(torch.rand(n, generator=g) < 0.5, -1, torch.randint(10, (n,), generator=g)) if conditional else None
    return x_T, cond


def segment_pairs(teacher, schedule, segs, grids: dict, x_T, cond=None, chunk: int = 512, final_timestep: int = -1):
    """Inputs x_a [K, N, ...] and teacher ends x_b [K, N, ...] of the K segments (t_a, t_b, grid name), all from
    the teacher's trajectories from x_T [N, ...] over grids[name]; also the states {name: {t: x_t}}."""
    states = {name: teacher_states(teacher, schedule, ts, x_T, cond, chunk, final_timestep) for name, ts in grids.items()}
    return torch.stack([states[g][a] for a, _, g in segs]), torch.stack([states[g][b] for _, b, g in segs]), states


def _jump(net, schedule, x, t_a, t_b, cond):
    return sample(net, schedule, x, [t_a], 0.0, plan_none(1), cond=cond, final_timestep=t_b)[0]


def _rms(a, b) -> float:
    return float(((a - b) ** 2).mean().sqrt())


@torch.no_grad()
def fidelity(student, base, schedule, segs, x_a, x_b, cond) -> dict:
    """Per segment: rms(student jump - teacher end) and rms(base's one DDIM step - teacher end)."""
    out = {}
    for k, (a, b, g) in enumerate(segs):
        out[f"{a}->{b}"] = {"grid": g, "shortcut_rms": _rms(_jump(student, schedule, x_a[k], a, b, cond), x_b[k]),
                            "base_one_step_rms": _rms(_jump(base, schedule, x_a[k], a, b, cond), x_b[k]),
                            "teacher_move_rms": _rms(x_a[k], x_b[k])}
    return out


@torch.no_grad()
def four_step(student, base, schedule, states, cond) -> dict:
    """The 4-step shortcut sampler and the base's own 4-step DDIM against the 50-step teacher (same x_T)."""
    x_T, teacher = states["paper"][FOUR_STEP[0]], states["paper"][-1]
    x_sc = sample(student, schedule, x_T, list(FOUR_STEP), 0.0, plan_none(4), cond=cond)[0]
    x_ddim = sample(base, schedule, x_T, list(FOUR_STEP), 0.0, plan_none(4), cond=cond)[0]
    return {"samples": {"teacher_50": teacher, "shortcut_4": x_sc, "base_ddim_4": x_ddim},
            "shortcut_rms_to_teacher": _rms(x_sc, teacher), "base_ddim_rms_to_teacher": _rms(x_ddim, teacher)}


def distil_segments(student, teacher, schedule, segs, grids: dict, draw, *, steps: int, batch: int, pool: int,
                    lr: float, generator: torch.Generator, held_out: int | None = None, held_generator=None,
                    lr_floor: float | None = None, chunk: int = 512, final_timestep: int = -1,
                    progress: bool = False, desc: str = "distil shortcut"):
    """THE distillation loop, for the toy models and Stable Diffusion alike: train every parameter of `student` (a
    denoiser module, changed in place) with Adam on the segment-wise regression of the module docstring.

    segs: [(t_a, t_b, grid name)]; grids: {name: the teacher's DDIM timesteps}; draw(n, generator) -> (x_T [n, ...],
    cond or None): the source of starts and conditioning, called for `pool` training trajectories, then for
    `held_out` (default: pool) held-out ones from held_generator (default: the same generator). lr_floor: None for
    a constant lr, else a cosine decay to lr_floor * lr. Returns (Shortcut (frozen), losses, fidelity on the
    held-out trajectories, held = (x_a, x_b, cond, states))."""
    from tqdm.auto import tqdm

    x_T, cond = draw(pool, generator)
    x_a, x_b, _ = segment_pairs(teacher, schedule, segs, grids, x_T, cond, chunk, final_timestep)
    coef = [step_coefficients(schedule, a, b, 0.0) for a, b, _ in segs]
    view = (-1,) + (1,) * (x_a.dim() - 1)
    a_of, b_of = (torch.tensor([getattr(c, k) for c in coef]).view(view).to(x_a) for k in ("a", "b"))
    eps_target = (x_b - a_of * x_a) / b_of
    t_of = torch.tensor([a for a, _, _ in segs])
    student.requires_grad_(True).train()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    lr_at = None if lr_floor is None else torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * lr_floor)
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        k = torch.randint(len(segs), (batch,), generator=generator)
        i = torch.randint(pool, (batch,), generator=generator)
        c = None if cond is None else cond[i]
        loss = ((student(x_a[k, i], t_of[k], c) - eps_target[k, i]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if lr_at is not None:
            lr_at.step()
        losses.append(loss.item())
    student.eval().requires_grad_(False)
    shortcut = Shortcut(student, {a: b for a, b, _ in segs})
    x_T, cond = draw(held_out or pool, held_generator or generator)
    x_a, x_b, states = segment_pairs(teacher, schedule, segs, grids, x_T, cond, chunk, final_timestep)
    return shortcut, losses, fidelity(shortcut, teacher, schedule, segs, x_a, x_b, cond), (x_a, x_b, cond, states)


def distil(name: str, steps: int | None = None, seed: int = 0, progress: bool = True, **recipe):
    """(Shortcut, meta): distil the shipped base checkpoint `name` (see the module docstring) with `distil_segments`;
    `recipe` overrides RECIPES[name] (pool, held_out, batch, lr)."""
    if name not in RECIPES:
        raise ValueError(f"name must be one of {sorted(RECIPES)}, got {name!r}")
    unknown = set(recipe) - set(RECIPES[name])
    if unknown:
        raise ValueError(f"recipe: unknown keys {sorted(unknown)}; allowed {sorted(RECIPES[name])}")
    r = {**RECIPES[name], **recipe}
    steps = steps or r["steps"]
    base, schedule, _ = store.load(name)
    shape, conditional = ((1, 8, 8), True) if name == "digits" else ((2,), False)
    torch.manual_seed(seed)
    segs = segments_for(schedule)
    grids = {g: chain_timesteps(schedule, cfg) for g, cfg in GRIDS.items()}
    shortcut, losses, fid, held = distil_segments(
        copy.deepcopy(base), base, schedule, segs, grids, lambda n, g: _draw(n, shape, conditional, g), steps=steps,
        batch=r["batch"], pool=r["pool"], lr=r["lr"], generator=torch.Generator().manual_seed(seed),
        held_out=r["held_out"], held_generator=torch.Generator().manual_seed(10_000 + seed), lr_floor=0.05,
        progress=progress, desc=f"distil shortcut_{name}")
    fs = four_step(shortcut, base, schedule, held[3], held[2])
    meta = {"schedule": schedule.config(), "base": name, "segments": [[a, b, gname] for a, b, gname in segs],
            "grids": {k: vars(v) for k, v in GRIDS.items()}, "pool": r["pool"], "steps": steps, "batch": r["batch"],
            "lr": r["lr"], "seed": seed, "final_loss": sum(losses[-100:]) / len(losses[-100:]), "fidelity": fid,
            "four_step": {k: v for k, v in fs.items() if k != "samples"}}
    shortcut.meta = meta
    return shortcut, meta


def few_step_loss(schedule, reward, *, batch: int, shape, cond=None, steps=FOUR_STEP):
    """loss_fn(model, step, generator) for tuning the shortcut ITSELF (the paper's weaker alternative to ShortFT):
    full backprop through its own few-step sampler `steps` (DDIM), model = a trainable copy of `Shortcut.net`,
    which is then used for inference with those same few steps."""
    require_differentiable(reward, "few-step tuning")

    def loss_fn(model, step: int, generator: torch.Generator):
        x_T, c = draw_start(model, batch, shape, cond, generator)
        x0, _ = sample(model, schedule, x_T, list(steps), 0.0, plan_full(len(steps)), cond=c)
        r = reward_with_graph(reward, x0, c, "few-step tuning")
        return -r.mean(), {"reward": r.mean().item()}

    return loss_fn


def load(name: str, data_dir: Path = store.DATA_DIR, device="cpu") -> Shortcut:
    """The shipped shortcut of base checkpoint `name` (frozen, eval mode)."""
    if not (Path(data_dir) / f"shortcut_{name}.safetensors").exists():
        raise FileNotFoundError(f"no shortcut for {name!r} in {data_dir}; make it with `python -m minialign.methods.shortcut {name}`")
    net, _, meta = store.load(f"shortcut_{name}", data_dir, device)
    return Shortcut(net, {a: b for a, b, _ in meta["segments"]}, meta).requires_grad_(False).eval()


def shipped(model: str) -> dict:
    """make_loss keywords for a shipped base model (the registry's `extra`): {"shortcut": load(name)};
    bench.py's "toy2d" is the gmm model."""
    return {"shortcut": load({"toy2d": "gmm"}.get(model, model))}


def main(argv=None):
    args, names = store.recipe_args(__doc__, RECIPES, argv, "override the recipe's number of student updates")
    for name in names:
        t0 = time.time()
        shortcut, meta = distil(name, args.steps, args.seed)
        cmd = f"python -m minialign.methods.shortcut {name}" + (f" --steps {args.steps}" if args.steps else "")
        cmd += f" --seed {args.seed}" if args.seed else ""
        meta.update(command=cmd, seconds=round(time.time() - t0, 1), threads=torch.get_num_threads(), torch=torch.__version__)
        path = store.save(shortcut.net, f"shortcut_{name}", meta, Path(args.out))
        for seg, f in meta["fidelity"].items():
            print(f"{name} {seg:>10} ({f['grid']}): shortcut rms {f['shortcut_rms']:.4f}  base one step "
                  f"{f['base_one_step_rms']:.4f}  teacher move {f['teacher_move_rms']:.4f}", file=sys.stderr)
        print(f"{name} 4-step rms to 50-step teacher: shortcut {meta['four_step']['shortcut_rms_to_teacher']:.4f}, "
              f"base DDIM {meta['four_step']['base_ddim_rms_to_teacher']:.4f}", file=sys.stderr)
        print(f"wrote {path} in {meta['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
