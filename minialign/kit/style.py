"""One colour and one name per method, in every notebook and figure: from the registry, colour-blind safe.

    from minialign.kit.style import color, label
    ax.plot(x, y, color=color("rlr"), label=label("rlr"))

Colours: Okabe & Ito's eight and Paul Tol's "muted" scheme (distinguishable under the common colour-vision
deficiencies), assigned in registry order, so a method keeps its colour in every notebook and a new method takes the
next free one. Names that are no registered method (a "no-grad chain", an RLR variant) get a stable colour from the rest
of the palette by their name.
"""
from __future__ import annotations

import zlib

OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
TOL_MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499")
# registry order: DDPO, full BP, full BP checkpointed, DRaFT-1, DRaFT-K, AlignProp, DRaFT-LV, ReFL, ShortFT, ShortFT
# (T-LoRA), SDO, RLR, RLR (released), SFT-PG. A family shares a hue (full backprop blues, truncated backprop greens,
# ShortFT reds, RLR purples); the colours of methods that are plotted together most differ most. Then the rest.
PALETTE = ("#E69F00", "#0072B2", "#56B4E9", "#009E73", "#117733", "#999933", "#44AA99", "#CC79A7", "#D55E00",
           "#CC6677", "#332288", "#882255", "#AA4499", "#DDCC77", "#F0E442", "#88CCEE", "#555555")
REFERENCE = "#000000"  # exact gradients, data, the pretrained model: drawn in black


def _registry():
    from minialign import methods

    return methods.REGISTRY


def color(name: str) -> str:
    """The method's colour (registry order); another name gets a fixed colour from its hash."""
    names = list(_registry())
    if name in names:
        return PALETTE[names.index(name) % len(PALETTE)]
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def label(name: str) -> str:
    """The method's human name from the registry (the name itself otherwise)."""
    reg = _registry()
    return reg[name].label if name in reg else name
