"""Rewards: values on hand-made inputs, the one signature, and the differentiable flag."""
import math

import pytest
import torch

from minialign.rewards import (
    Reward, brightness, classifier_reward, component_log_density, jpeg_compressibility, require_differentiable,
    symmetry, target_region,
)
from minialign.toy.data import gmm_centres, load_digits_tensors


def test_symmetry_is_maximal_for_a_symmetric_image():
    x = torch.randn(3, 1, 8, 8)
    sym = (x + x.flip(-1)) / 2
    r_sym, r = symmetry()(sym), symmetry()(x)
    assert torch.allclose(r_sym, torch.zeros(3))
    assert (r < r_sym).all()
    half = torch.zeros(1, 1, 8, 8)
    half[..., :4] = 1.0  # left half 1, right half 0: every pixel differs from its mirror by 1
    assert torch.allclose(symmetry()(half), torch.tensor([-1.0]))


def test_brightness_is_monotone_and_its_gradient_is_uniform():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    levels = [brightness()(x + d) for d in (-0.2, 0.0, 0.3)]
    assert (levels[0] < levels[1]).all() and (levels[1] < levels[2]).all()
    x.requires_grad_(True)
    brightness()(x).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 / 64))


def test_jpeg_constant_image_is_more_compressible_than_noise():
    const = torch.zeros(2, 1, 8, 8)
    noise = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = jpeg_compressibility()
    assert (r(const) > r(noise)).all()
    assert (r(const) < 0).all()  # negative size in kB
    assert not r.differentiable
    rgb = torch.rand(2, 3, 16, 16) * 2 - 1  # colour images go through the same path
    assert r(rgb).shape == (2,)


def test_classifier_reward_is_a_probability_and_recognises_real_digits():
    x, y = load_digits_tensors("test")
    x, y = x[:200], y[:200]
    probs = torch.stack([classifier_reward(d)(x) for d in range(10)], 1)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert torch.allclose(probs.sum(1), torch.ones(len(x)), atol=1e-5)
    own = classifier_reward(None)(x, y)  # target=None scores each image against its label
    assert torch.allclose(own, probs.gather(1, y[:, None]).squeeze(1))
    assert own.mean() > 0.9
    torch.testing.assert_close(classifier_reward(5, log=True)(x), probs[:, 5].log(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pass cond"):
        classifier_reward(None)(x)
    with pytest.raises(ValueError, match="target"):
        classifier_reward(11)


def test_classifier_reward_is_differentiable():
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    classifier_reward(4)(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_2d_rewards_against_closed_forms():
    x = torch.tensor([[1.0, 0.0], [1.05, 0.0], [0.0, 2.0]], dtype=torch.float64)
    r = target_region((1.0, 0.0), radius=0.1)(x)
    assert torch.allclose(r, torch.tensor([0.0, 0.0, -(math.sqrt(5) - 0.1)], dtype=torch.float64))
    mu = gmm_centres()[3].double()
    oracle = torch.distributions.MultivariateNormal(mu, 0.3**2 * torch.eye(2, dtype=torch.float64))
    assert torch.allclose(component_log_density(3, std=0.3)(x), oracle.log_prob(x))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        target_region()(torch.zeros(2, 3))


def test_reward_signature_and_the_differentiable_flag():
    bad = Reward(lambda x, c: x.sum(), "sum-of-all")
    with pytest.raises(ValueError, match=r"sum-of-all.*shape \[B\]"):
        bad(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"my-method.*jpeg\(q=95\).*not differentiable"):
        require_differentiable(jpeg_compressibility(), "my-method")
    require_differentiable(symmetry(), "my-method")  # no error
    require_differentiable(lambda x, c: x.sum(1), "my-method")  # plain callables count as differentiable
