"""Toy networks: a 2-D MLP denoiser, a small conv UNet for 8x8 digits, and a digit classifier.

Every denoiser has the sampler's signature: eps = model(x_t, t, cond), t a LongTensor [B].
Each class keeps its constructor arguments in `self.config` so checkpoints rebuild it (store.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minialign.layers import ConditionalLinear


class MLPDenoiser(nn.Module):
    """2-D denoiser, x: [B, dim]. Two time embeddings:

    "table"       SFT-PG's toy network: 2 -> 128 -> 128 -> 128 -> 2 with softplus, each hidden layer multiplied
                  by a learned per-timestep vector (one row per step: right for T = 10, too many rows to learn
                  well for T = 1000).
    "sinusoidal"  a shared sinusoidal embedding of t and random Fourier features of x (fixed, seeded), concatenated
                  into a SiLU MLP; learns the thin swiss roll at T = 1000 (the table version gave a blob).
    """

    def __init__(self, T: int, dim: int = 2, hidden: int = 128, embedding: str = "table", fourier: int = 16):
        super().__init__()
        if embedding not in ("table", "sinusoidal"):
            raise ValueError(f"embedding must be 'table' or 'sinusoidal', got {embedding!r}")
        self.config = {"T": T, "dim": dim, "hidden": hidden, "embedding": embedding, "fourier": fourier}
        if embedding == "table":
            self.l1 = ConditionalLinear(dim, hidden, T)
            self.l2 = ConditionalLinear(hidden, hidden, T)
            self.l3 = ConditionalLinear(hidden, hidden, T)
            self.out = nn.Linear(hidden, dim)
        else:
            g = torch.Generator().manual_seed(1234)
            self.register_buffer("freqs", 4.0 * torch.randn(dim, fourier, generator=g))
            d_in = dim + 2 * fourier + 64
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, cond=None):
        if x.dim() != 2 or x.shape[1] != self.config["dim"]:
            raise ValueError(f"x must have shape [B, {self.config['dim']}], got {tuple(x.shape)}")
        if self.config["embedding"] == "table":
            h = F.softplus(self.l1(x, t))
            h = F.softplus(self.l2(h, t))
            h = F.softplus(self.l3(h, t))
            return self.out(h)
        proj = 2 * math.pi * x @ self.freqs.to(x.dtype)
        feats = torch.cat([x, proj.sin(), proj.cos(), timestep_embedding(t, 64).to(x.dtype)], 1)
        return self.net(feats)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of integer timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], 1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class DigitsUNet(nn.Module):
    """A small UNet for [B, 1, 8, 8] digits: 8x8 -> 4x4 -> 2x2 and back, skip connections.

    num_classes > 0 makes it class-conditional: cond is a LongTensor [B] of labels, or None (or -1
    entries) for the unconditional model (a learned null class, trained with label dropout), which
    gives classifier-free guidance for free.
    """

    def __init__(self, T: int, base: int = 32, num_classes: int = 10):
        super().__init__()
        self.config = {"T": T, "base": base, "num_classes": num_classes}
        c1, c2, e = base, 2 * base, 4 * base
        self.time = nn.Sequential(nn.Linear(base, e), nn.SiLU(), nn.Linear(e, e))
        self.label = nn.Embedding(num_classes + 1, e) if num_classes else None
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, e)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, e)
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid = ResBlock(c2, c2, e)
        self.up2 = ResBlock(2 * c2, c2, e)
        self.up1 = ResBlock(c2 + c1, c1, e)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def embed(self, t, cond, batch):
        emb = self.time(timestep_embedding(t, self.config["base"]))
        if self.label is not None:
            null = self.config["num_classes"]
            if cond is None:
                cond = torch.full((batch,), null, dtype=torch.long, device=t.device)
            else:
                cond = torch.where(cond < 0, torch.full_like(cond, null), cond)
            emb = emb + self.label(cond)
        return emb

    def forward(self, x, t, cond=None):
        if x.dim() != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"x must have shape [B, 1, 8, 8], got {tuple(x.shape)}")
        emb = self.embed(t, cond, x.shape[0])
        h1 = self.down1(self.inp(x), emb)  # 8x8
        h2 = self.down2(self.pool1(h1), emb)  # 4x4
        h = self.mid(self.pool2(h2), emb)  # 2x2
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], 1), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), emb)
        return self.out(h)


class DigitsClassifier(nn.Module):
    """A small CNN on [B, 1, 8, 8] digits in [-1, 1]; `features` is its penultimate layer [B, 128]."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.config = {"width": width}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(2 * w * 16, 128), nn.SiLU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x):
        if x.dim() != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"x must have shape [B, 1, 8, 8], got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


class DigitsMLP(DigitsClassifier):
    """The "gold" digit classifier: an MLP on the 64 flattened pixels (no convolution, no weight shared with
    DigitsClassifier, trained on another split), so the arena can score what the reward classifier does not see.
    `features` is its penultimate layer [B, hidden]; it inherits only DigitsClassifier's features/forward."""

    def __init__(self, hidden: int = 256):
        nn.Module.__init__(self)  # its own layers, not the CNN's
        self.config = {"hidden": hidden}
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                  nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, 10)


MODELS = {"mlp": MLPDenoiser, "unet": DigitsUNet, "classifier": DigitsClassifier, "gold_mlp": DigitsMLP}
