"""The "gradient plan" picture: which steps of the chain keep a graph, for each method (the notebooks' map).

One row per method, one column per sampling step (x_T on the left, x_0 on the right). Each cell says what
that step contributes to the gradient with respect to the network's parameters:

    graph         the network call keeps its graph and the latent path to x_0 is kept (pathwise gradient)
    checkpointed  the same, with the call recomputed in backward instead of storing its activations
    input only    a frozen network (ShortFT's shortcut) differentiated with respect to its input only
    path only     eps is a constant, but the linear term a_t x_t carries an earlier graph on to x_0
    likelihood    the step's log-probability enters a likelihood-ratio (policy-gradient) term
    no graph      sampled without graph; contributes nothing
    not run       the chain stops earlier (ReFL scores x0_hat at its step)

Rows built from the sampler's own plan functions (full backprop, DRaFT-K, AlignProp, SDO) use them, so the
picture follows the code; RLR, ReFL, DDPO, SFT-PG and ShortFT are drawn from their definitions (methods/).
A method that draws its step at random (AlignProp's K, DRaFT-LV's noise, ReFL's t, SDO's k, RLR's j) is shown
at one example draw, marked with a dot.
"""
from __future__ import annotations

from typing import Optional, Sequence

from minialign.sampling import plan_full, plan_one_step, plan_truncated

KINDS = {  # kind: (colour, legend text)
    "graph": ("#1f5fa8", "network with graph (pathwise)"),
    "checkpointed": ("#6b9bd6", "with graph, checkpointed"),
    "input only": ("#e08a1e", "frozen shortcut, gradient through its input"),
    "path only": ("#b9d3ee", "eps constant, linear path a_t x_t kept"),
    "likelihood": ("#3d9a50", "likelihood-ratio term (log-prob of the step)"),
    "no graph": ("#f2f2f2", "no graph (sampled only)"),
    "not run": ("#ffffff", "not run"),
}
DEFAULT_METHODS = ("full_bp", "full_bp_ckpt", "draft_k", "alignprop", "draft_lv", "refl", "sdo", "rlr", "shortft",
                   "ddpo", "sft_pg")


def from_plan(plan) -> list[str]:
    """Cell kinds of a sampler plan, for gradients to the parameters: a step without graph matters only when its
    latent path carries an earlier graph on (every step after a graph step, unless a step cuts the path)."""
    kinds, carrying = [], False
    for p in plan:
        carrying = carrying and p.path
        if p.grad:
            kinds.append("checkpointed" if p.checkpoint else "graph")
            carrying = True
        else:
            kinds.append("path only" if carrying else "no graph")
    return kinds


def rows(n_steps: int = 10, k: int = 3, example: Optional[int] = None, h: int = 2) -> dict[str, tuple[list[str], bool]]:
    """{method name: (kinds per step, drawn at random)} for a chain of n_steps (>= 6); k: DRaFT-K's K;
    example: the example random step (default n_steps // 2); h: RLR's sub-chain length."""
    if not isinstance(n_steps, int) or n_steps < 6:
        raise ValueError(f"n_steps must be an int >= 6 (the picture needs room for every method), got {n_steps!r}")
    if not isinstance(k, int) or not 1 <= k <= n_steps:
        raise ValueError(f"k must be an int in 1..n_steps={n_steps}, got {k!r}")
    if not isinstance(h, int) or not 1 <= h <= n_steps - 2:
        raise ValueError(f"h must be an int in 1..n_steps-2={n_steps - 2}, got {h!r}")
    j = n_steps // 2 if example is None else example
    if not isinstance(j, int) or not 0 <= j <= n_steps - 1 - h:
        raise ValueError(f"example must be a step in 0..n_steps-1-h={n_steps - 1 - h}, got {example!r}")
    n = n_steps
    refl = ["no graph"] * j + ["graph"] + ["not run"] * (n - j - 1)
    rlr = ["likelihood"] * n
    rlr[j:j + h] = ["graph"] * h
    rlr[j + h - 1] = "likelihood+graph"  # HO: steps j..L-1 re-run with graph, the likelihood ratio at L = j + h - 1
    rlr[-1] = "graph"
    short = ["no graph"] * (n - 8) + ["graph", "input only", "input only", "graph", "input only", "input only",
                                      "graph", "graph"]
    return {
        "full_bp": (from_plan(plan_full(n)), False),
        "full_bp_ckpt": (from_plan(plan_full(n, checkpoint=True)), False),
        "draft_k": (from_plan(plan_truncated(n, k)), False),
        "draft_1": (from_plan(plan_truncated(n, 1)), False),
        "alignprop": (from_plan(plan_truncated(n, n - j, keep_path=True)), True),
        "draft_lv": (from_plan(plan_truncated(n, 1)), True),
        "refl": (refl, True),
        "sdo": (from_plan(plan_one_step(n, j)), True),
        "rlr": (rlr, True),
        "shortft": (short, False),
        "ddpo": (["likelihood"] * n, False),
        "sft_pg": (["likelihood"] * n, False),
    }


NOTES = {"draft_lv": "x0 re-noised and denoised n times", "refl": "reward on x0_hat at a random late step",
         "rlr": "j random; FO last, HO j..j+h, ZO elsewhere", "shortft": "schematic: 3 trainable steps, 3 jumps",
         "sft_pg": "reward = a learned critic", "alignprop": "K random", "sdo": "k random"}


def plan_figure(methods: Optional[Sequence[str]] = None, n_steps: int = 10, ax=None, highlight: Optional[str] = None,
                k: int = 3):
    """Draw the gradient plans of `methods` (registry names; default: all the families) on `ax`; returns ax.
    highlight: one method whose row label is drawn in bold (the notebook's own method)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.transforms import offset_copy

    from minialign.methods import REGISTRY

    table = rows(n_steps, k=k)
    methods = list(DEFAULT_METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in table]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty list from {sorted(table)}, got unknown {unknown or methods}")
    if highlight is not None and highlight not in methods:
        raise ValueError(f"highlight must be one of methods {methods}, got {highlight!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 0.48 * len(methods) + 1.6))
    for r, name in enumerate(methods):
        kinds, random = table[name]
        y = len(methods) - 1 - r
        for i, kind in enumerate(kinds):
            both = kind == "likelihood+graph"
            colour = KINDS["graph" if both else kind][0]
            ax.add_patch(Rectangle((i, y + 0.1), 0.92, 0.8, facecolor=colour, edgecolor="#888888", lw=0.6))
            if both:
                ax.add_patch(Rectangle((i, y + 0.1), 0.92, 0.8, facecolor="none", edgecolor=KINDS["likelihood"][0],
                                       lw=3))
        if random:
            where = next(i for i, kd in enumerate(kinds) if kd in ("graph", "likelihood+graph"))
            ax.plot(where + 0.46, y + 0.5, "o", color="white", ms=5, mec="black")
        label = REGISTRY[name].label if name in REGISTRY else name
        ax.text(-0.3, y + 0.5, label, ha="right", va="center", fontsize=10,
                fontweight="bold" if name == highlight else "normal")
        if name in NOTES:
            ax.text(n_steps + 0.2, y + 0.5, NOTES[name], ha="left", va="center", fontsize=9, color="#444444")
    ax.set_xlim(-0.1, n_steps + 0.1)
    ax.set_ylim(0, len(methods))
    ax.set_xticks([i + 0.46 for i in range(n_steps)], [f"{i + 1}" for i in range(n_steps)], fontsize=9)
    ax.set_yticks([])
    ax.set_xlabel(f"sampling step (x_T on the left, x_0 on the right; {n_steps} steps)", fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [Patch(facecolor=c, edgecolor="#888888", label=t) for kind, (c, t) in KINDS.items() if kind != "not run"]
    handles.append(Patch(facecolor="none", edgecolor=KINDS["likelihood"][0], lw=3, label="graph + likelihood ratio (end of RLR's HO sub-chain)"))
    handles.append(plt.Line2D([], [], marker="o", color="white", mec="black", ls="", label="one random draw shown"))
    below = offset_copy(ax.transAxes, ax.figure, y=-40, units="points")  # under the x label, whatever the height
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=3, fontsize=9,
              frameon=False)
    ax.set_title("Gradient plans: what each step of the chain contributes to the gradient", fontsize=11)
    return ax
