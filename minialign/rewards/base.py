"""The one reward signature: `reward(images, cond) -> Tensor[B]`, higher is better.

A `Reward` wraps a function of a batch of samples (and the batch's conditioning, which most rewards
ignore) and says whether it is differentiable. Gradient-based methods (full backprop, DRaFT,
AlignProp, ReFL, ...) call `require_differentiable` before they start: a non-differentiable reward
(JPEG size) is refused with a clear error, never silently detached. Policy-gradient methods (DDPO)
need only reward values and accept any reward.
"""
from __future__ import annotations

from typing import Callable

import torch


class Reward:
    """A reward r(images, cond) -> Tensor[B] with a `differentiable` flag and a `name`.

    fn:             the function itself, (images [B, ...], cond) -> [B]
    differentiable: True if autograd can take d r / d images (the result keeps the images' graph)
    """

    def __init__(self, fn: Callable[[torch.Tensor, object], torch.Tensor], name: str, differentiable: bool = True):
        self.fn, self.name, self.differentiable = fn, name, differentiable

    def __call__(self, images: torch.Tensor, cond=None) -> torch.Tensor:
        r = self.fn(images, cond)
        if r.shape != images.shape[:1]:
            raise ValueError(f"reward {self.name!r} must return shape [B] = {tuple(images.shape[:1])}, got {tuple(r.shape)}")
        return r

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, differentiable={self.differentiable})"


def require_differentiable(reward, method: str) -> None:
    """Raise ValueError if `method` (which backpropagates through the reward) is given a reward that is
    not differentiable. A plain callable without a `differentiable` attribute is taken as differentiable."""
    if not getattr(reward, "differentiable", True):
        name = getattr(reward, "name", repr(reward))
        raise ValueError(
            f"{method} backpropagates through the reward, but reward {name!r} is not differentiable "
            "(differentiable=False). Use a policy-gradient method that needs only reward values "
            "(minialign.methods.ddpo), or a differentiable reward."
        )


def check_reward_graph(reward_value: torch.Tensor, reward, method: str) -> None:
    """After evaluating a reward on samples that carry a graph: refuse a result without one (a reward
    that detaches internally would otherwise train nothing, silently)."""
    if not reward_value.requires_grad:
        name = getattr(reward, "name", repr(reward))
        raise ValueError(
            f"{method}: reward {name!r} returned a value with no graph to the samples, so no gradient can flow; "
            "it is not differentiable (mark it differentiable=False and use DDPO)"
        )


def reward_with_graph(reward, x0: torch.Tensor, cond, method: str) -> torch.Tensor:
    """r(x0, cond) [B] for a pathwise method, refusing samples or a result that carry no graph."""
    if not x0.requires_grad:
        raise ValueError(
            f"{method}: the sample carries no graph (does the model have trainable parameters? "
            "call model.requires_grad_(True) on a copy of the pretrained model)"
        )
    r = reward(x0, cond)
    check_reward_graph(r, reward, method)
    return r
