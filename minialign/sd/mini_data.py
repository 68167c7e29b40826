"""mini-SD's data and its two quality scores: coloured, upsampled 8x8 digits with captions (issue 12, source (b)).

An image is a scikit-learn 8x8 digit v in [0, 1] (16 grey levels), upsampled bilinearly to 16x16 and tinted by
one of six colours c (RGB with max component 1) on black:

    image = 2 (v_up * c) - 1   in [-1, 1], [3, 16, 16]          caption = "a {colour} digit {number word}"

Scores of generated images x in [-1, 1] [B, 3, 16, 16]:
    digit_of:  the shipped digit classifier (data/classifier) on the grey 8x8 image 2 avgpool2(max_channel((x + 1) / 2)) - 1,
               which inverts the tint (max(c) = 1) and the upsampling up to blur
    colour_of: the palette colour nearest to the mean RGB of the bright pixels (max channel > 0.5), both divided by
               their max component (so brightness does not matter, only hue and whiteness); -1 when no pixel is bright
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.3, 1.0),
           "yellow": (1.0, 1.0, 0.0), "purple": (0.7, 0.0, 1.0), "white": (1.0, 1.0, 1.0)}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 16


def _check_colour(colour):
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {list(COLOURS)}, got {colour!r}")


def caption(digit: int, colour: str) -> str:
    """'a red digit seven' for (7, 'red')."""
    if not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}")
    _check_colour(colour)
    return f"a {colour} digit {NUMBERS[digit]}"


def all_captions() -> list[str]:
    """The 60 captions, digit-major: index 6 d + k is digit d in the k-th colour of COLOURS."""
    return [caption(d, c) for d in range(10) for c in COLOURS]


def tint(gray: torch.Tensor, colours) -> torch.Tensor:
    """Coloured images [B, 3, 16, 16] in [-1, 1] from digits gray [B, 1, 8, 8] in [-1, 1] and B colour names."""
    if gray.dim() != 4 or gray.shape[1:] != (1, 8, 8):
        raise ValueError(f"gray must be digits [B, 1, 8, 8], got shape {tuple(gray.shape)}")
    if len(colours) != gray.shape[0]:
        raise ValueError(f"colours must name one colour per image ({gray.shape[0]}), got {len(colours)}")
    for c in colours:
        _check_colour(c)
    v = F.interpolate((gray + 1) / 2, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    rgb = torch.tensor([COLOURS[c] for c in colours], dtype=gray.dtype)[:, :, None, None]
    return 2 * v * rgb - 1


def dataset(split: str = "all"):
    """Every digit of `split` in every colour: (images [6N, 3, 16, 16], digits [6N], colour indices [6N], captions)."""
    from minialign.toy.data import load_digits_tensors

    gray, y = load_digits_tensors(split)
    names = list(COLOURS)
    k = torch.arange(len(names)).repeat_interleave(len(y))
    digits = y.repeat(len(names))
    images = tint(gray.repeat(len(names), 1, 1, 1), [names[i] for i in k])
    return images, digits, k, [caption(int(d), names[int(i)]) for d, i in zip(digits, k)]


def to_gray8(images: torch.Tensor) -> torch.Tensor:
    """The classifier's view of images [B, 3, 16, 16] in [-1, 1]: grey [B, 1, 8, 8] in [-1, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] RGB, got shape {tuple(images.shape)}")
    v = ((images + 1) / 2).clamp(0, 1).amax(1, keepdim=True)
    return 2 * F.adaptive_avg_pool2d(v, 8) - 1


def digit_of(images: torch.Tensor, classifier=None) -> torch.Tensor:
    """The digit [B] the shipped classifier reads in each image."""
    if classifier is None:
        from minialign.toy.store import load

        classifier = load("classifier")[0]
    with torch.no_grad():
        return classifier.eval()(to_gray8(images).float()).argmax(1)


def colour_of(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The index [B] into COLOURS of each image's colour (-1: no pixel brighter than threshold)."""
    v = ((images.detach().float() + 1) / 2).clamp(0, 1)
    bright = (v.amax(1) > threshold).float()                           # [B, H, W]
    n = bright.flatten(1).sum(1)
    mean = (v * bright[:, None]).flatten(2).sum(2) / n.clamp(min=1)[:, None]   # [B, 3]
    mean = mean / mean.amax(1, keepdim=True).clamp(min=1e-6)
    palette = torch.tensor(list(COLOURS.values()))
    idx = torch.cdist(mean, palette).argmin(1)
    return torch.where(n > 0, idx, torch.full_like(idx, -1))


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """A picture [rows (H + 1), nrow (W + 1), 3] in [0, 1] of images [B, 3, H, W] in [-1, 1] (clamped), nrow a row,
    one white pixel between them (for plt.imshow)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] RGB, got shape {tuple(images.shape)}")
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    x = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu()
    b, c, h, w = x.shape
    rows = -(-b // nrow)
    canvas = torch.ones(c, rows * (h + 1), nrow * (w + 1))
    for i in range(b):
        r, k = divmod(i, nrow)
        canvas[:, r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = x[i]
    return canvas.permute(1, 2, 0)
