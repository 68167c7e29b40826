"""Rewards on 8x8 digit images [B, 1, 8, 8] in [-1, 1] (the sampler's space; no decoding).

    classifier:   r = softmax(classifier(x))[target]    probability of a target digit (differentiable)
    brightness:   r = mean over pixels of x             (differentiable)
    symmetry:     r = -mean (x - flip_lr(x))^2          0 for a left-right symmetric image (differentiable)
    jpeg:         r = -(JPEG file size in kB)           compressibility, DDPO's reward (NOT differentiable)

Images are scored as sampled, without clamping to [-1, 1]: a pathwise method may push pixels out of
range to please the classifier, and that drift is something the notebooks are meant to show.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from minialign.rewards.base import Reward


def _check_images(x: torch.Tensor):
    if x.dim() != 4:
        raise ValueError(f"image rewards take [B, C, H, W], got shape {tuple(x.shape)}")


def classifier_reward(target: int | None = 0, classifier=None, log: bool = False, temperature: float = 1.0,
                      label_offset: int = 0, clamp: bool = False) -> Reward:
    """Probability the shipped digit classifier (data/classifier, frozen) gives the digit `target`.

    target=None scores each image against its conditioning label (cond, a LongTensor [B]) plus `label_offset`
    (mod 10): label_offset=1 asks a model told "3" to draw a 4. Output in [0, 1]; differentiable through the
    frozen classifier. log=True returns the log-probability instead (<= 0, unbounded below: its gradient does not
    vanish when p saturates). temperature > 1 divides the logits (softmax(z / T)): p approaches 1 only for a
    logit margin T times larger, so the reward keeps rising long after the digit is recognisable.
    clamp=True scores the image clamped to [-1, 1] (what a display shows), so pushing pixels out of range buys nothing.
    """
    if target is not None and not 0 <= int(target) <= 9:
        raise ValueError(f"target must be a digit in 0..9 or None (use cond), got {target!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if label_offset and target is not None:
        raise ValueError(f"label_offset={label_offset} shifts the conditioning label: it needs target=None")
    if classifier is None:
        from minialign.toy.store import load

        classifier = load("classifier")[0]
    classifier.eval().requires_grad_(False)

    def fn(x, cond=None):
        _check_images(x)
        logits = classifier.to(x.device, x.dtype)(x.clamp(-1, 1) if clamp else x) / temperature
        probs = logits.log_softmax(1) if log else logits.softmax(1)
        if target is not None:
            return probs[:, int(target)]
        if cond is None:
            raise ValueError("classifier_reward(target=None) scores images against their labels: pass cond [B]")
        labels = (torch.as_tensor(cond, device=x.device).long().expand(x.shape[0]) + label_offset) % 10
        return probs.gather(1, labels[:, None]).squeeze(1)

    what = f"digit={target}" if target is not None else ("label" + (f"+{label_offset}" if label_offset else ""))
    extras = (f", T={temperature:g}" if temperature != 1 else "") + (", clamped" if clamp else "")
    return Reward(fn, f"classifier({'log ' if log else ''}p({what}){extras})", differentiable=True)


def brightness() -> Reward:
    """Mean pixel value, in [-1, 1] for in-range images."""

    def fn(x, cond=None):
        _check_images(x)
        return x.flatten(1).mean(1)

    return Reward(fn, "brightness", differentiable=True)


def symmetry() -> Reward:
    """Left-right symmetry: -mean (x - x flipped along width)^2; maximal (0) for a symmetric image."""

    def fn(x, cond=None):
        _check_images(x)
        return -((x - x.flip(-1)) ** 2).flatten(1).mean(1)

    return Reward(fn, "symmetry", differentiable=True)


def jpeg_compressibility(quality: int = 95) -> Reward:
    """Negative JPEG size in kB (Pillow, `quality` as DDPO's 95). Higher = more compressible.
    Pixels are mapped [-1, 1] -> [0, 255] and rounded: not differentiable."""
    from PIL import Image

    def fn(x, cond=None):
        _check_images(x)
        arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        sizes = []
        for img in arr:
            img = np.ascontiguousarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=x.dtype, device=x.device)

    return Reward(fn, f"jpeg(q={quality})", differentiable=False)
