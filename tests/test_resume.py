"""train()'s resume is bit-exact for every registered method: interrupted after a checkpoint, then resumed in a
fresh model and a fresh loss_fn (as a new process would), it ends with the parameters and history of an
uninterrupted run. DDPO is also run with its KL penalty and with two minibatches (its PPO cycle, stored batch,
permutation and KL reference all travel in the checkpoint)."""
import copy
import inspect

import pytest
import torch

from minialign import methods
from minialign.methods import shortft
from minialign.methods.chain import chain_timesteps
from minialign.methods.shortcut import Shortcut
from minialign.rewards import component_log_density
from minialign.schedule import Schedule
from minialign.toy.models import MLPDenoiser
from minialign.train import TrainConfig, train

SCH = Schedule.make("linear", 50, 1e-3, 5e-2)
REWARD = component_log_density(2, std=0.7)
# 8 steps, checkpoints after steps 3 and 6, the interrupted run stops after step 5: it resumes from step 3, which
# is in the middle of DDPO's PPO cycle (2 updates per batch; 4 with two minibatches) and of SFT-PG's critic phase
STEPS, CKPT_EVERY, STOP_AFTER = 8, 3, 5
CASES = [(name, {}) for name in methods.REGISTRY] + [
    ("ddpo", dict(kl_coef=0.5)),
    ("ddpo", dict(kl_coef=0.5, minibatches=2, timestep_fraction=0.5)),
    ("rlr", dict(j_dist="grad_norm")),   # its moving averages of |g_HO| per start travel in loss_fn.state_dict()
    ("shortft", dict(progressive=2)),    # the stage follows the step
]


def _toy():
    torch.manual_seed(0)
    return MLPDenoiser(SCH.T, hidden=16).double()


def _loss_fn(name, overrides, model):
    """The registered method on the toy; SFT-PG gets data, a method taking a shortcut (ShortFT) a frozen copy of
    the pretrained net holding its jumps (as tests/test_shortft.py builds one); a method's `prepare` hook (T-LoRA's
    adapters) runs on the model before train() builds the optimiser."""
    method = methods.get(name)
    takes_shortcut = "shortcut" in inspect.signature(method.make_loss).parameters
    over = dict(batch=4, n_steps=10, **overrides)
    if takes_shortcut:
        over["anchors"] = (999, 600, 300, 100)  # on T = 50, 10 steps: anchors snap to 49, 29, 14, 4
    if "k" in method.defaults and not method.defaults.get("random_k"):
        over["k"] = min(method.defaults["k"], 3)
    cfg = method.make_config(**over)
    extra = {}
    if method.needs_data:
        extra["data"] = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.5
    if takes_shortcut:
        segments = dict(shortft.jumps(shortft.layout(chain_timesteps(SCH, cfg), cfg.anchors, SCH.T)))
        extra["shortcut"] = Shortcut(copy.deepcopy(model), segments).requires_grad_(False)
    if getattr(method, "prepare", None) is not None:
        method.prepare(model, cfg)
    loss_fn, _ = methods.build(name, SCH, None if method.needs_data else REWARD, shape=(2,), config=cfg, extra=extra)
    return loss_fn


def _run(name, overrides, out_dir, stop_after=None):
    model = _toy()

    def interrupt(step, row):
        if step == stop_after:
            raise KeyboardInterrupt

    cfg = TrainConfig(steps=STEPS, lr=1e-2, seed=2, ckpt_every=CKPT_EVERY, out_dir=str(out_dir), progress=False)
    history = train(model, _loss_fn(name, overrides, model), cfg, callback=interrupt if stop_after else None)
    return model, [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.parametrize("name,overrides", CASES, ids=[n + "".join(f"-{k}" for k in o) for n, o in CASES])
def test_resume_equals_the_uninterrupted_run(name, overrides, tmp_path):
    straight, straight_history = _run(name, overrides, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _run(name, overrides, tmp_path / "resumed", stop_after=STOP_AFTER)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == CKPT_EVERY
    resumed, resumed_history = _run(name, overrides, tmp_path / "resumed")  # a fresh model and loss_fn
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {key} differs after the resume"
    assert resumed_history == straight_history
