"""Pretrain the toy models and write them under data/ (safetensors + JSON with the command).

    python -m minialign.toy.pretrain swissroll      # 2-D, T = 1000, MLP
    python -m minialign.toy.pretrain swissroll10    # SFT-PG's toy: 2-D, trained directly with T = 10
    python -m minialign.toy.pretrain gmm            # 2-D Gaussian mixture, T = 1000
    python -m minialign.toy.pretrain digits         # 8x8 digits, class-conditional UNet, T = 1000
    python -m minialign.toy.pretrain classifier     # digit classifier (reward and quality score)
    python -m minialign.toy.pretrain gold           # the arena's "gold" classifier: an MLP on another split
    python -m minialign.toy.pretrain all

Denoisers minimise the usual epsilon-prediction loss E ||eps - eps_theta(q_sample(x0, t, eps), t)||^2.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minialign.schedule import Schedule, q_sample
from minialign.toy import data, store
from minialign.toy.models import DigitsClassifier, DigitsMLP, DigitsUNet, MLPDenoiser

# name -> (dataset, schedule args, model factory, optimiser, steps, batch, lr)
RECIPES = {
    # SFT-PG's toy (DESIGN 4.2): RMSprop 1e-3, batch 128; sigmoid betas 1e-5..1e-2.
    "swissroll10": dict(data="swissroll", schedule=("sigmoid", 10, 1e-5, 1e-2), opt="rmsprop", steps=30000, batch=128, lr=1e-3),
    # many-step references: shared sinusoidal time embedding + Fourier features (see MLPDenoiser)
    "swissroll": dict(data="swissroll", schedule=("sigmoid", 1000, 1e-5, 1e-2), opt="adam", steps=20000, batch=512, lr=1e-3,
                      net=dict(hidden=256, embedding="sinusoidal")),
    "gmm": dict(data="gmm", schedule=("sigmoid", 1000, 1e-5, 1e-2), opt="adam", steps=10000, batch=512, lr=1e-3,
                net=dict(hidden=256, embedding="sinusoidal")),
    "digits": dict(data="digits", schedule=("linear", 1000, 1e-4, 2e-2), opt="adam", steps=5000, batch=128, lr=2e-3),
    "classifier": dict(data="digits", opt="adam", steps=3000, batch=128, lr=2e-3),
    # independent of the reward's classifier: another architecture (DigitsMLP), another stratified split (seed 1)
    "gold": dict(data="digits", opt="adam", steps=3000, batch=128, lr=1e-3, split_seed=1),
}


def _optimiser(name, params, lr):
    return (torch.optim.RMSprop if name == "rmsprop" else torch.optim.Adam)(params, lr=lr)


def _lr_lambda(steps):  # linear warm-up over 2% then cosine decay to 5%
    warm = max(1, steps // 50)
    return lambda i: min(1.0, (i + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(i / steps * 3.14159265)).item()))


def train_denoiser(name: str, steps: int | None = None, seed: int = 0, progress: bool = True):
    r = RECIPES[name]
    steps = steps or r["steps"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    schedule = Schedule.make(*r["schedule"])
    if r["data"] == "digits":
        x_all, y_all = data.load_digits_tensors("all")
        model = DigitsUNet(schedule.T)
    else:
        x_all, y_all = data.load_2d(r["data"], 10000, seed=seed), None
        model = MLPDenoiser(schedule.T, **r.get("net", {}))
    opt = _optimiser(r["opt"], model.parameters(), r["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    losses = []
    bar = tqdm(range(steps), desc=f"pretrain {name}", disable=not progress)
    for i in bar:
        idx = torch.randint(0, len(x_all), (r["batch"],), generator=g)
        x0 = x_all[idx]
        t = torch.randint(0, schedule.T, (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        cond = None
        if y_all is not None:  # label dropout 10%: the same net is also the unconditional model
            cond = torch.where(torch.rand(len(idx), generator=g) < 0.1, -1, y_all[idx])
        loss = F.mse_loss(model(q_sample(schedule, x0, t, eps), t, cond), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if i % 200 == 0:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    meta = {"schedule": schedule.config(), "data": r["data"], "steps": steps, "batch": r["batch"], "lr": r["lr"],
            "optimizer": r["opt"], "seed": seed, "final_loss": sum(losses[-500:]) / len(losses[-500:])}
    return model.eval(), meta


def train_classifier(steps: int | None = None, seed: int = 0, progress: bool = True):
    r = RECIPES["classifier"]
    steps = steps or r["steps"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr = data.load_digits_tensors("train")
    x_te, y_te = data.load_digits_tensors("test")
    model = DigitsClassifier()
    opt = _optimiser(r["opt"], model.parameters(), r["lr"])
    acc = _fit_classifier(model, opt, (x_tr, y_tr), (x_te, y_te), steps, r["batch"], g, "classifier", progress)
    return model, {"steps": steps, "batch": r["batch"], "lr": r["lr"], "seed": seed, "test_accuracy": acc,
                   "split": "stratified 80/20, seed 0 (minialign.toy.data.load_digits_tensors)"}


def _fit_classifier(model, opt, train, test, steps: int, batch: int, g, name: str, progress: bool) -> float:
    """Cross-entropy steps on noised training digits (cosine schedule); returns the held-out accuracy."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    for _ in tqdm(range(steps), desc=f"pretrain {name}", disable=not progress):
        idx = torch.randint(0, len(x_tr), (batch,), generator=g)
        # light noise augmentation so the reward is not fooled by tiny off-manifold perturbations
        x = x_tr[idx] + 0.1 * torch.randn(len(idx), 1, 8, 8, generator=g)
        loss = F.cross_entropy(model(x), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return (model(x_te).argmax(1) == y_te).float().mean().item()


def train_gold(steps: int | None = None, seed: int = 0, progress: bool = True):
    """The held-out quality score's classifier (DigitsMLP) on the digits split with seed 1: its test set is its own,
    its training set overlaps the reward classifier's only by chance (both are 80% of the 1797 images)."""
    r = RECIPES["gold"]
    steps = steps or r["steps"]
    torch.manual_seed(seed + 1)
    g = torch.Generator().manual_seed(seed + 1)
    train, test = (data.load_digits_tensors(s, seed=r["split_seed"]) for s in ("train", "test"))
    model = DigitsMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=1e-2)
    acc = _fit_classifier(model, opt, train, test, steps, r["batch"], g, "gold", progress)
    return model, {"steps": steps, "batch": r["batch"], "lr": r["lr"], "optimizer": "adamw, weight decay 1e-2",
                   "seed": seed, "test_accuracy": acc, "split": f"stratified 80/20, seed {r['split_seed']} "
                   "(minialign.toy.data.load_digits_tensors; the reward classifier's split has seed 0)"}


def main(argv=None):
    args, names = store.recipe_args(__doc__, RECIPES, argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in names:
        t0 = time.time()
        if name == "classifier":
            model, meta = train_classifier(args.steps, args.seed)
        elif name == "gold":
            model, meta = train_gold(args.steps, args.seed)
        else:
            model, meta = train_denoiser(name, args.steps, args.seed)
        cmd = f"python -m minialign.toy.pretrain {name}" + (f" --steps {args.steps}" if args.steps else "")
        cmd += f" --seed {args.seed}" if args.seed else ""
        meta.update(command=cmd, seconds=round(time.time() - t0, 1), threads=torch.get_num_threads(),
                    torch=torch.__version__)
        from pathlib import Path

        path = store.save(model, name, meta, Path(args.out))
        print(f"wrote {path} in {meta['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
