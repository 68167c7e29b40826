"""Toy data: the 2-D swiss roll of SFT-PG's authors, a Gaussian mixture, and scikit-learn's 8x8 digits.

Everything is generated or ships with scikit-learn: nothing is downloaded.
"""
from __future__ import annotations

import math

import numpy as np
import torch

DATASETS_2D = ("swissroll", "gmm")


def swiss_roll(n: int = 10000, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """SFT-PG's toy data [n, 2]: make_swiss_roll(n, noise=0.05), columns 0 and 2, divided by 20
    (DESIGN 4.2); the points span about [-0.55, 0.75]."""
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    return torch.tensor(x[:, [0, 2]] / 20.0, dtype=torch.float32)


def gaussian_mixture(n: int = 10000, k: int = 8, radius: float = 1.0, std: float = 0.08, seed: int = 0):
    """k isotropic Gaussians evenly spaced on a circle; returns (points [n, 2], component [n])."""
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(0, k, (n,), generator=g)
    angle = 2 * math.pi * comp.double() / k
    centres = radius * torch.stack([angle.cos(), angle.sin()], 1)
    return (centres + std * torch.randn(n, 2, generator=g, dtype=torch.float64)).float(), comp


def gmm_centres(k: int = 8, radius: float = 1.0) -> torch.Tensor:
    angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    return (radius * torch.stack([angle.cos(), angle.sin()], 1)).float()


def load_2d(name: str, n: int = 10000, seed: int = 0) -> torch.Tensor:
    if name == "swissroll":
        return swiss_roll(n, seed=seed)
    if name == "gmm":
        return gaussian_mixture(n, seed=seed)[0]
    raise ValueError(f"dataset must be one of {DATASETS_2D}, got {name!r}")


def load_digits_tensors(split: str = "all", test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as images in [-1, 1]: (x [N, 1, 8, 8] float32, y [N] long).

    split: "all", "train" or "test" (a fixed stratified split, seed 0, 20% test).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 8.0 - 1.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    if split == "all":
        return x, y
    rng = np.random.RandomState(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        test[rng.choice(idx, int(round(len(idx) * test_fraction)), replace=False)] = True
    if split == "test":
        return x[test], y[test]
    if split == "train":
        return x[~test], y[~test]
    raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
