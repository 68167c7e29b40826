"""Sample-quality metrics: sliced Wasserstein distance, MMD, a digits quality score, the denoising error."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minialign.schedule import Schedule, q_sample


def wasserstein_1d(px: torch.Tensor, py: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Exact W_p^p between the empirical distributions of sorted columns px [N, K] and py [M, K] (per column).

    W_p^p = int_0^1 |F^-1(u) - G^-1(u)|^p du with both quantile functions piecewise constant: on the merged
    grid of breakpoints {i/N} u {j/M} each piece pairs one x with one y, so the integral is an exact sum
    (no interpolation, equal or unequal N and M)."""
    n, m = len(px), len(py)
    if n == m:
        return ((px - py).abs() ** p).mean(0)
    u = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
    u = u.unique()  # sorted, ends at 1
    width = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - width / 2  # a point inside each piece
    ix = (mid * n).floor().long().clamp(max=n - 1)
    iy = (mid * m).floor().long().clamp(max=m - 1)
    return (width[:, None] * (px[ix] - py[iy]).abs() ** p).sum(0)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 100, p: int = 2, seed: int = 0) -> float:
    """SWD_p between two point clouds [N, D] and [M, D] (SFT-PG's metric: 100 projections, p = 2).

    Each random unit direction gives the exact 1-D Wasserstein distance between the projected samples
    (`wasserstein_1d`, exact for N != M too); the result is (mean over directions of W_p^p)^(1/p).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] and [M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = (x.double().cpu() @ dirs).sort(0).values
    py = (y.double().cpu() @ dirs).sort(0).values
    return float(wasserstein_1d(px, py, p).mean() ** (1 / p))


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.05, 0.1, 0.2, 0.5, 1.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels exp(-|a-b|^2 / (2 h^2)); x [N, D], y [M, D].

    bandwidths=None: the median heuristic, h in (0.5, 1, 2) x the median distance between points of y
    (right for high-dimensional features, where fixed small bandwidths make every kernel value ~0).
    The unbiased estimate can be slightly negative when the two distributions are equal.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] and [M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    if bandwidths is None:
        med = torch.cdist(y[:1000], y[:1000]).median().clamp_min(1e-12).item()
        bandwidths = (0.5 * med, med, 2 * med)

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


@torch.no_grad()
def digits_score(images: torch.Tensor, labels: torch.Tensor | None, classifier, reference: torch.Tensor | None = None) -> dict:
    """Quality of digit samples [B, 1, 8, 8] in [-1, 1] judged by the shipped classifier.

    accuracy:   fraction classified as the label they were conditioned on (if labels given)
    confidence: mean max-softmax probability (sharp, recognisable digits score high)
    feature_mmd: squared MMD (RBF kernels, median heuristic) in the classifier's 128-d feature space to
                 `reference` images (real digits), a small-scale analogue of FID (lower is better; ~0 for
                 real digits, slightly negative values are estimator noise)
    """
    if images.dim() != 4 or images.shape[1:] != (1, 8, 8):
        raise ValueError(f"images must be [B, 1, 8, 8], got {tuple(images.shape)}")
    probs = classifier(images).softmax(1)
    out = {"confidence": probs.max(1).values.mean().item()}
    if labels is not None:
        out["accuracy"] = (probs.argmax(1) == labels.to(probs.device)).float().mean().item()
    if reference is not None:
        fx, fr = classifier.features(images), classifier.features(reference.to(images.device))
        out["feature_mmd"] = mmd_rbf(fx, fr, bandwidths=None)
    return out


@torch.no_grad()
def denoising_error(denoiser, schedule: Schedule, x0: torch.Tensor, timesteps, generator=None, cond=None) -> list[float]:
    """The pretraining loss per timestep, E||eps - eps_theta(q_sample(x0, t, eps), t)||^2 (mean over dims):
    how well the network still denoises the forward process's marginals."""
    out = []
    for t in timesteps:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        tb = torch.full((len(x0),), int(t), dtype=torch.long, device=x0.device)
        out.append(F.mse_loss(denoiser(q_sample(schedule, x0, tb, eps), tb, cond), eps).item())
    return out
