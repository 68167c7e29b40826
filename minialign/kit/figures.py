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

Each row is the method's own: its registry entry's `row` hook (minialign.methods.plan_rows) builds it from the
method's default config on this chain, through the sampler's plan functions (full backprop, DRaFT-K, AlignProp,
SDO), ShortFT's `layout`, or the method's definition (RLR, ReFL, DDPO, SFT-PG); a method that declares no row is
drawn as "no picture". A method that draws its step at random (AlignProp's K, DRaFT-LV's noise, ReFL's t, SDO's k,
RLR's j) is shown at one example draw, marked with a dot.
"""
from __future__ import annotations

from typing import Optional, Sequence

KINDS = {  # kind: (colour, legend text)
    "graph": ("#1f5fa8", "network with graph (pathwise)"),
    "checkpointed": ("#6b9bd6", "with graph, checkpointed"),
    "input only": ("#e08a1e", "frozen shortcut, gradient through its input"),
    "path only": ("#b9d3ee", "eps constant, linear path a_t x_t kept"),
    "likelihood": ("#3d9a50", "likelihood-ratio term (log-prob of the step)"),
    "no graph": ("#f2f2f2", "no graph (sampled only)"),
    "not run": ("#ffffff", "not run"),
}
TITLE = "Gradient plans: what each step of the chain contributes to the gradient"
CELLS = set(KINDS) | {"likelihood+graph"}  # + a graph step that is also the likelihood ratio (RLR's HO end)


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


def rows(n_steps: int = 10, example: Optional[int] = None, methods: Optional[Sequence[str]] = None,
         overrides: Optional[dict] = None) -> dict[str, Optional[tuple[list[str], Optional[int], Optional[str]]]]:
    """{method name: (kinds per step, the cell of the example random draw or None, note)} for a chain of n_steps (>= 6), each from the method's
    registry `row` hook on its default config for that chain (None for a method that declares no row).
    methods: registry names (default: every registered method); example: the step shown for a random draw
    (default: the middle of each method's range); overrides: {method: config fields} (e.g. {"draft_k": {"k": 3}})."""
    from minialign.methods import REGISTRY, get

    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 6:
        raise ValueError(f"n_steps must be an int >= 6 (the picture needs room for every method), got {n_steps!r}")
    if example is not None and (not isinstance(example, int) or not 0 <= example <= n_steps - 1):
        raise ValueError(f"example must be None or a step in 0..n_steps-1={n_steps - 1}, got {example!r}")
    overrides = overrides or {}
    out = {}
    for name in (list(REGISTRY) if methods is None else methods):
        m = get(name)
        if m.row is None:
            out[name] = None
            continue
        batch = m.make_config().batch
        cfg = m.make_config(**{**m.chain_overrides(n_steps, batch), "n_steps": n_steps, **overrides.get(name, {})})
        cells, drawn, note = m.row(cfg, example)
        cells = list(cells)
        kinds = from_plan(cells) if cells and not isinstance(cells[0], str) else cells
        if len(kinds) != n_steps or not set(kinds) <= CELLS:
            raise ValueError(f"{name}'s plan row must give one of {sorted(CELLS)} per step ({n_steps}), got {kinds}")
        out[name] = (kinds, drawn, note)
    return out


def plan_figure(methods: Optional[Sequence[str]] = None, n_steps: int = 10, ax=None, highlight: Optional[str] = None,
                example: Optional[int] = None, overrides: Optional[dict] = None, title: Optional[str] = None):
    """Draw the gradient plans of `methods` (registry names; default: every registered method) on `ax`; returns ax.
    highlight: one method whose row label is drawn in bold (the notebook's own method); example, overrides: as
    `rows`; title: the axes' title (default TITLE; a notebook that shows methods it has not defined yet says
    "preview" there). A method that declares no plan row is drawn as "no picture"."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.transforms import offset_copy

    from minialign.methods import REGISTRY

    methods = list(REGISTRY if methods is None else methods)
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty list from {sorted(REGISTRY)}, got unknown {unknown or methods}")
    if highlight is not None and highlight not in methods:
        raise ValueError(f"highlight must be one of methods {methods}, got {highlight!r}")
    table = rows(n_steps, example, methods, overrides)
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 0.48 * len(methods) + 1.6))
    for r, name in enumerate(methods):
        y = len(methods) - 1 - r
        label = REGISTRY[name].label
        ax.text(-0.3, y + 0.5, label, ha="right", va="center", fontsize=10,
                fontweight="bold" if name == highlight else "normal")
        if table[name] is None:
            ax.text(n_steps / 2, y + 0.5, "no picture (the method declares no plan row)", ha="center", va="center",
                    fontsize=10, color="#888888")
            continue
        kinds, drawn, note = table[name]
        for i, kind in enumerate(kinds):
            both = kind == "likelihood+graph"
            colour = KINDS["graph" if both else kind][0]
            ax.add_patch(Rectangle((i, y + 0.1), 0.92, 0.8, facecolor=colour, edgecolor="#888888", lw=0.6))
            if both:
                ax.add_patch(Rectangle((i, y + 0.1), 0.92, 0.8, facecolor="none", edgecolor=KINDS["likelihood"][0],
                                       lw=3))
        if drawn is not None:
            ax.plot(drawn + 0.46, y + 0.5, "o", color="white", ms=5, mec="black")
        if note:
            ax.text(n_steps + 0.2, y + 0.5, note, ha="left", va="center", fontsize=10, color="#444444")
    ax.set_xlim(-0.1, n_steps + 0.1)
    ax.set_ylim(0, len(methods))
    ax.set_xticks([i + 0.46 for i in range(n_steps)], [f"{i + 1}" for i in range(n_steps)], fontsize=10)
    ax.set_yticks([])
    ax.set_xlabel(f"sampling step (x_T on the left, x_0 on the right; {n_steps} steps)", fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [Patch(facecolor=c, edgecolor="#888888", label=t) for kind, (c, t) in KINDS.items() if kind != "not run"]
    handles.append(Patch(facecolor="none", edgecolor=KINDS["likelihood"][0], lw=3, label="graph + likelihood ratio (end of RLR's HO sub-chain)"))
    handles.append(plt.Line2D([], [], marker="o", color="white", mec="black", ls="", label="one random draw shown"))
    below = offset_copy(ax.transAxes, ax.figure, y=-40, units="points")  # under the x label, whatever the height
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=3, fontsize=10,
              frameon=False)
    ax.set_title(TITLE if title is None else title, fontsize=11)
    return ax
