"""Weight-free rewards on Stable Diffusion images [B, 3, H, W] in [-1, 1] (what `decode` returns), higher is better.

Same signature and `Reward` objects as minialign.rewards; wrap one with `latent_reward(pipe, r)` to score latents.

    brightness:     r = mean_{c,h,w} clamp(x)                                   (differentiable)
    symmetry:       r = -mean_{c,h,w} (clamp(x) - flip_lr(clamp(x)))^2         (differentiable; 0 = symmetric)
    colour_target:  p = (clamp(x) + 1) / 2 in [0, 1],
                    soft mask w = sigmoid((max_c p - threshold) / softness)   ("bright" = the stroke, not the background)
                    m = sum_hw w p / sum_hw w   (mean colour of the bright pixels, RGB in [0, 1])
                    r = -|m / max_c m - target|^2   (hue and whiteness, not brightness: as mini-SD's colour_of;
                                                     differentiable; 0 = exactly on target)
    digit:          the shipped 8x8 digit classifier (data/classifier) on the image turned into a digit:
                    g = max_c clamp(x) (a coloured stroke on black keeps its intensity whatever the hue),
                    d = average-pool g to 8x8 (mini-SD's to_gray8), r = log p(target | d)   (differentiable)
    jpeg:           -(JPEG size in kB) of the image (Pillow, quality 95)        (NOT differentiable: DDPO only)

clamp: the decoder's output may leave [-1, 1]; by default the rewards score the clamped image (what a display shows),
so pushing pixels out of range buys nothing (clamp=False scores the raw decode).

Conditioning: the methods hand a reward the batch's conditioning, on SD the packed prompt embeddings [B, 2, L, D].
A prompt-dependent target (each sample's own colour or digit) is a callable cond -> targets; `prompt_lookup` builds
one from the prompts: it finds each row's prompt by its embedding and returns that prompt's value.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from minialign.rewards import Reward, classifier_reward
from minialign.rewards import jpeg_compressibility as _jpeg
from minialign.sd.mini_data import COLOURS  # mini-SD's palette (the colours its captions name), max component 1


def _check(x: torch.Tensor):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)
        raise ValueError(f"SD image rewards take RGB images [B, 3, H, W] in [-1, 1] (decode's output), got {got}")


def _display(x: torch.Tensor, clamp: bool) -> torch.Tensor:
    _check(x)
    return x.clamp(-1, 1) if clamp else x


def brightness(clamp: bool = True) -> Reward:
    """Mean pixel value over channels and pixels, in [-1, 1]."""
    return Reward(lambda x, c=None: _display(x, clamp).flatten(1).mean(1), "brightness", differentiable=True)


def symmetry(clamp: bool = True) -> Reward:
    """Left-right symmetry, -mean (x - x flipped along width)^2: 0 for a mirror-symmetric image, down to -4."""

    def fn(x, cond=None):
        x = _display(x, clamp)
        return -((x - x.flip(-1)) ** 2).flatten(1).mean(1)

    return Reward(fn, "symmetry", differentiable=True)


def _rgb(target) -> torch.Tensor:
    if isinstance(target, str):
        if target not in COLOURS:
            raise ValueError(f"target colour must be one of {sorted(COLOURS)} or an (r, g, b) in [0, 1], got {target!r}")
        return torch.tensor(COLOURS[target])
    t = torch.as_tensor(target, dtype=torch.float32)
    if t.shape[-1:] != (3,) or t.dim() > 2 or not ((t >= 0) & (t <= 1)).all():
        raise ValueError(f"target colour must be a name, an (r, g, b) in [0, 1] or [B, 3] of them, got {target!r}")
    return t


def mean_bright_colour(x: torch.Tensor, threshold: float = 0.5, softness: float = 0.05) -> torch.Tensor:
    """[B, 3]: the mean RGB (in [0, 1]) of the pixels whose brightest channel exceeds `threshold`, soft-masked
    by sigmoid((max_c p - threshold) / softness) so that the mask itself has a gradient."""
    p = (x + 1) / 2
    w = torch.sigmoid((p.amax(1, keepdim=True) - threshold) / softness)  # [B, 1, H, W]
    return (w * p).flatten(2).sum(2) / w.flatten(2).sum(2).clamp_min(1e-6)


def colour_target(target: Union[str, Sequence[float], Callable] = "red", threshold: float = 0.5, softness: float = 0.05,
                  clamp: bool = True, normalise: bool = True) -> Reward:
    """-|mean colour of the bright pixels (divided by its largest component if normalise) - target|^2, in [-3, 0].

    target: a colour name (COLOURS), an (r, g, b) in [0, 1], or a callable cond -> names / [B, 3] (each sample's
    own colour, e.g. prompt_lookup(pipe, prompts, ["red", "blue"])).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1) (a brightness of the brightest channel), got {threshold!r}")
    if not softness > 0:
        raise ValueError(f"softness must be > 0, got {softness!r}")
    fixed = None if callable(target) else _rgb(target)

    def fn(x, cond=None):
        x = _display(x, clamp)
        if fixed is None:
            t = target(cond)
            t = torch.stack([_rgb(u) for u in t]) if isinstance(t, (list, tuple)) else _rgb(t)
        else:
            t = fixed
        m = mean_bright_colour(x, threshold, softness)
        if normalise:
            m = m / m.amax(1, keepdim=True).clamp_min(1e-6)
        return -((m - t.to(m).expand_as(m)) ** 2).sum(1)

    name = target if isinstance(target, str) else ("per prompt" if fixed is None else tuple(fixed.tolist()))
    return Reward(fn, f"colour({name})", differentiable=True)


def to_digit_image(x: torch.Tensor, size: int = 8, clamp: bool = True) -> torch.Tensor:
    """[B, 1, size, size] in [-1, 1]: brightest channel, average-pooled (adaptive) to size x size."""
    return F.adaptive_avg_pool2d(_display(x, clamp).amax(1, keepdim=True), size)


def digit(target: Union[int, Callable] = 0, log: bool = True, classifier=None, clamp: bool = True) -> Reward:
    """(log) p(target digit) of the shipped 8x8 classifier on to_digit_image(x).

    target: a digit 0..9, or a callable cond -> LongTensor [B] (each sample's own digit, e.g.
    prompt_lookup(pipe, prompts, [7, 1])). log=True: log p (its gradient does not vanish as p -> 1).
    """
    if not callable(target) and (not isinstance(target, int) or not 0 <= target <= 9):
        raise ValueError(f"target must be a digit in 0..9 or a callable cond -> labels [B], got {target!r}")
    inner = classifier_reward(None, classifier=classifier, log=log)

    def fn(x, cond=None):
        small = to_digit_image(x, clamp=clamp)
        labels = target(cond) if callable(target) else target
        return inner(small, torch.as_tensor(labels, device=x.device).long().expand(x.shape[0]))

    return Reward(fn, f"digit({'log ' if log else ''}p={target if not callable(target) else 'per prompt'})", True)


def jpeg_compressibility(quality: int = 95) -> Reward:
    """-(JPEG size in kB) of each RGB image (minialign.rewards.jpeg_compressibility; not differentiable)."""
    r = _jpeg(quality)
    return Reward(lambda x, c=None: r(_display(x, True), c), r.name, differentiable=False)


def prompt_lookup(pipe, prompts: Sequence[str], values: Sequence, negative_prompt=None) -> Callable:
    """cond -> [values[i] for each row], where i is the prompt whose embedding the row's conditional part equals.

    cond: packed embeddings [B, 2, L, D] (encode_prompt) or [B, L, D]. A row matching no prompt (max abs
    difference > 1e-4 to every one) raises ValueError naming the prompts.
    """
    from minialign.sd.adapter import encode_prompt

    if len(prompts) != len(values) or not prompts:
        raise ValueError(f"prompts and values must be non-empty and of equal length, got {len(prompts)} and {len(values)}")
    table = encode_prompt(pipe, list(prompts), negative_prompt)[:, 1]  # [P, L, D]

    def lookup(cond):
        if not isinstance(cond, torch.Tensor) or cond.dim() not in (3, 4):
            raise ValueError(f"cond must be prompt embeddings [B, 2, L, D] or [B, L, D], got {type(cond)}")
        rows = cond[:, 1] if cond.dim() == 4 else cond
        dist = (rows[:, None].float() - table[None].to(rows.device).float()).abs().flatten(2).amax(2)  # [B, P]
        best = dist.min(1)
        if (best.values > 1e-4).any():
            raise ValueError(f"cond: some rows match none of the prompts {list(prompts)} (smallest distances "
                             f"{best.values.tolist()})")
        idx = best.indices.tolist()
        picked = [values[i] for i in idx]
        return torch.tensor(picked) if all(isinstance(v, int) for v in picked) else picked

    return lookup
