"""Toy data, networks, checkpoints and metrics."""
import json

import pytest
import torch

from minialign import metrics
from minialign.toy import data, store
from minialign.toy.models import DigitsClassifier, DigitsUNet, MLPDenoiser


def test_swiss_roll_is_the_authors_toy():
    from sklearn.datasets import make_swiss_roll

    x = data.swiss_roll(500, seed=3)
    raw, _ = make_swiss_roll(500, noise=0.05, random_state=3)
    torch.testing.assert_close(x, torch.tensor(raw[:, [0, 2]] / 20, dtype=torch.float32))
    assert x.shape == (500, 2)


def test_digits_split_is_stratified_and_disjoint():
    xa, ya = data.load_digits_tensors("all")
    xtr, ytr = data.load_digits_tensors("train")
    xte, yte = data.load_digits_tensors("test")
    assert xa.shape == (1797, 1, 8, 8) and xa.min() == -1 and xa.max() == 1
    assert len(xtr) + len(xte) == 1797
    assert torch.bincount(yte, minlength=10).min() >= 30
    with pytest.raises(ValueError, match="split"):
        data.load_digits_tensors("val")
    with pytest.raises(ValueError, match="dataset"):
        data.load_2d("moons")


def test_shapes_and_errors():
    t = torch.randint(0, 10, (3,))
    assert MLPDenoiser(10)(torch.randn(3, 2), t).shape == (3, 2)
    unet = DigitsUNet(10, base=8)
    assert unet(torch.randn(3, 1, 8, 8), t, torch.tensor([1, -1, 9])).shape == (3, 1, 8, 8)
    assert unet(torch.randn(3, 1, 8, 8), t, None).shape == (3, 1, 8, 8)
    assert DigitsClassifier()(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\]"):
        MLPDenoiser(10)(torch.randn(3, 3), t)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, 8, 8\]"):
        unet(torch.randn(3, 1, 16, 16), t)


def test_null_label_equals_unconditional():
    unet = DigitsUNet(10, base=8)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    torch.testing.assert_close(unet(x, t, torch.tensor([-1, -1])), unet(x, t, None))


def test_save_load_round_trip(tmp_path):
    from minialign.schedule import Schedule

    net = MLPDenoiser(10, hidden=8)
    sch = Schedule.make("sigmoid", 10, 1e-5, 1e-2)
    store.save(net, "tiny", {"schedule": sch.config(), "command": "test"}, tmp_path)
    loaded, sch2, meta = store.load("tiny", tmp_path)
    x, t = torch.randn(4, 2), torch.randint(0, 10, (4,))
    assert torch.equal(loaded(x, t), net(x, t))
    assert torch.equal(sch2.betas, sch.betas) and meta["command"] == "test"
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError, match="python -m minialign.toy.pretrain nothing"):
        store.load("nothing", tmp_path)


@pytest.mark.parametrize("name", ["swissroll10", "swissroll", "gmm", "digits", "classifier"])
def test_shipped_checkpoints_load_and_record_their_command(name):
    model, schedule, meta = store.load(name)
    assert meta["command"].startswith(f"python -m minialign.toy.pretrain {name}")
    assert (schedule is None) == (name == "classifier")
    meta_file = json.loads((store.DATA_DIR / f"{name}.json").read_text())
    assert meta_file["kind"] in ("mlp", "unet", "classifier")


def test_sliced_wasserstein_oracles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g)
    assert metrics.sliced_wasserstein(x, x) == 0
    # a shift by d along every direction u moves each projection by <u, d>: SWD_2 = |d| sqrt(E[u_1^2]) = |d| / sqrt(2)
    shift = torch.tensor([0.6, 0.0])
    got = metrics.sliced_wasserstein(x, x + shift, n_projections=2000)
    assert abs(got - 0.6 / 2**0.5) < 0.02
    # different sample sizes: the exact 1-D distance on merged quantile breakpoints
    assert metrics.sliced_wasserstein(x, x[:1000]) < 0.1
    with pytest.raises(ValueError, match="x and y"):
        metrics.sliced_wasserstein(x, torch.randn(10, 3))


def test_mmd_is_zero_for_same_distribution_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    same, diff = metrics.mmd_rbf(a, b), metrics.mmd_rbf(a, b + 1.0)
    assert abs(same) < 5e-3 and diff > 0.1


def test_digits_score_on_real_digits_is_high():
    clf, _, meta = store.load("classifier")
    x, y = data.load_digits_tensors("test")
    xr, _ = data.load_digits_tensors("train")
    s = metrics.digits_score(x, y, clf, reference=xr)
    assert s["accuracy"] > 0.95 and s["accuracy"] == pytest.approx(meta["test_accuracy"], abs=1e-6)
    noise = metrics.digits_score(torch.rand(300, 1, 8, 8) * 2 - 1, y[:300], clf, reference=xr)
    assert noise["feature_mmd"] > 5 * s["feature_mmd"] and noise["accuracy"] < 0.3


@pytest.mark.parametrize("n, m", [(7, 5), (10, 4), (6, 6), (1, 3)])
def test_wasserstein_1d_is_exact_for_unequal_sizes(n, m):
    """Oracle: repeat every point of x m times and of y n times; both clouds then have n*m equal-weight points
    and the sorted difference is the exact W_p^p. (Interpolated quantiles were ~1% off.)"""
    g = torch.Generator().manual_seed(n * 10 + m)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64).sort(0).values
    y = (torch.randn(m, 3, generator=g, dtype=torch.float64) + 0.3).sort(0).values
    xr, yr = x.repeat_interleave(m, 0), y.repeat_interleave(n, 0)
    for p in (1, 2):
        torch.testing.assert_close(metrics.wasserstein_1d(x, y, p), ((xr - yr).abs() ** p).mean(0), rtol=1e-12, atol=1e-12)


def test_pretrain_command_line_writes_a_checkpoint_with_its_command(tmp_path):
    from minialign.toy import pretrain

    pretrain.main(["classifier", "--steps", "2", "--seed", "1", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "classifier.json").read_text())
    assert meta["command"] == "python -m minialign.toy.pretrain classifier --steps 2 --seed 1"
    assert (tmp_path / "classifier.safetensors").exists()
    with pytest.raises(SystemExit):
        pretrain.main(["no_such_recipe"])
