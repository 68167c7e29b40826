"""One colour and one name per method, in every notebook and figure: from the registry, colour-blind safe.

    from minialign.kit.style import color, label
    ax.plot(x, y, color=color("rlr"), label=label("rlr"))

Colours: Okabe & Ito's eight (distinguishable under the common colour-vision deficiencies), then Paul Tol's "muted"
scheme, assigned in registry order, so a method keeps its colour in every notebook and a new method takes the next
free one. Names that are no registered method (a "no-grad chain", an RLR variant) get a stable colour from the rest
of the palette by their name.
"""
from __future__ import annotations

import zlib

OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
TOL_MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499")
PALETTE = OKABE_ITO[1:] + TOL_MUTED + ("#555555",)  # black (Okabe-Ito's first) is kept for references and data
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
