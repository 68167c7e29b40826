"""ShortFT and its shortcut against oracles: with the exact multi-step chain as the shortcut ShortFT is full
backprop (or DRaFT-K after a truncation point); with a frozen exact chain it is full backprop through a chain
whose skipped segments use frozen weights; the shortcut never trains and inference never calls it."""
import copy

import pytest
import torch

from minialign import methods
from minialign.methods import full_bp, shortft, truncated_bp
from minialign.methods.chain import chain_timesteps, draw_start
from minialign.rewards import component_log_density, jpeg_compressibility
from minialign.sampling import plan_full, sample
from minialign.schedule import Schedule
from minialign.shortcut import ExactJump, Shortcut
from minialign.toy.models import MLPDenoiser
from minialign.train import TrainConfig, train

SHAPE = (2,)
REWARD = component_log_density(2, std=0.7)
# T = 50, 10 trailing steps: ts = 49, 44, ..., 4; anchors (1000-step scale) snap to 49, 29, 14, 4
CFG = dict(batch=4, n_steps=10, anchors=(999, 600, 300, 100))


def _toy(T=50, seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(T, hidden=16).double(), Schedule.make("linear", T, 1e-3, 5e-2)


def _exact(net, sch, cfg):
    ts = chain_timesteps(sch, cfg)
    return ExactJump(net, sch, ts, dict(shortft.jumps(shortft.layout(ts, cfg.anchors, sch.T))))


def _grad(loss_fn, net, seed=3):
    loss, stats = loss_fn(net, 0, torch.Generator().manual_seed(seed))
    g = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    return loss, stats, torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, net.parameters())])


def test_layout_of_the_paper_chain():
    ts = chain_timesteps(Schedule.make("linear", 1000), shortft.ShortFTConfig(n_steps=50, spacing="leading", offset=1))
    got = [(p.kind, p.steps[0], p.land) for p in shortft.layout(ts, shortft.PAPER_ANCHORS, 1000)]
    assert got == [("head", 981, 761), ("base", 761, 741), ("jump", 741, 501), ("base", 501, 481),
                   ("jump", 481, 261), ("base", 261, 241), ("jump", 241, 1), ("base", 1, -1)]
    assert shortft.layout(ts, shortft.PAPER_ANCHORS, 1000)[0].steps == tuple(range(981, 761, -20))


def test_layout_snaps_to_the_arena_chain():
    ts = chain_timesteps(Schedule.make("linear", 1000), shortft.ShortFTConfig(n_steps=20))
    pieces = shortft.layout(ts, shortft.PAPER_ANCHORS, 1000)
    assert [p.steps[0] for p in pieces if p.kind == "base"] == [749, 499, 249, 49]
    assert shortft.jumps(pieces) == [(699, 499), (449, 249), (199, 49)]


def test_exact_jump_is_the_multi_step_teacher():
    net, sch = _toy()
    ts = chain_timesteps(sch, shortft.ShortFTConfig(**CFG))
    exact = ExactJump(net, sch, ts, {44: 29})
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        one = sample(exact, sch, x, [44], 0.0, final_timestep=29)[0]
        many = sample(net, sch, x, [44, 39, 34], 0.0, final_timestep=29)[0]
    torch.testing.assert_close(one, many, rtol=1e-12, atol=1e-12)


def test_with_the_exact_chain_as_shortcut_shortft_is_full_backprop():
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**CFG)
    l_s, stats, g_s = _grad(shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=_exact(net, sch, cfg)), net)
    l_f, _, g_f = _grad(full_bp.make_loss(sch, REWARD, full_bp.FullBPConfig(batch=4, n_steps=10), shape=SHAPE), net)
    torch.testing.assert_close(l_s, l_f, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_s, g_f, rtol=1e-9, atol=1e-12)
    assert g_f.norm() > 0 and stats["graph_calls"] == 7.0


def test_with_a_truncation_point_the_exact_chain_gives_draft_k():
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**{**CFG, "anchors": (600, 300, 100)})  # head 49..34, then 29 -> ... -> 0
    _, _, g_s = _grad(shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=_exact(net, sch, cfg)), net)
    tb = truncated_bp.TruncatedBPConfig(batch=4, n_steps=10, k=6)
    _, _, g_k = _grad(truncated_bp.make_loss(sch, REWARD, tb, shape=SHAPE), net)
    torch.testing.assert_close(g_s, g_k, rtol=1e-9, atol=1e-12)


def test_frozen_jumps_pass_gradient_through_their_input_only():
    """Oracle: the full chain with the trainable net at the base steps and a frozen copy elsewhere, full backprop."""
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**CFG)
    frozen = copy.deepcopy(net).requires_grad_(False)
    _, _, g_s = _grad(shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=_exact(frozen, sch, cfg)), net)
    ts = chain_timesteps(sch, cfg)
    base_ts = {49, 29, 14, 4}
    mixed = lambda x, t, c: (net if int(t[0]) in base_ts else frozen)(x, t, c)  # noqa: E731
    x_T, _ = draw_start(net, 4, SHAPE, None, torch.Generator().manual_seed(3))
    x0, _ = sample(mixed, sch, x_T, ts, 0.0, plan_full(len(ts)))
    g_o = torch.cat([g.flatten() for g in torch.autograd.grad(-REWARD(x0).mean(), list(net.parameters()))])
    torch.testing.assert_close(g_s, g_o, rtol=1e-9, atol=1e-12)
    _, _, g_f = _grad(full_bp.make_loss(sch, REWARD, full_bp.FullBPConfig(batch=4, n_steps=10), shape=SHAPE), net)
    assert (g_s - g_f).norm() > 1e-3 * g_f.norm()  # the jumps' parameters really are left out


class _Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        return self.net(x, t, cond)


def _shortcut(net, sch, cfg):
    segs = dict(shortft.jumps(shortft.layout(chain_timesteps(sch, cfg), cfg.anchors, sch.T)))
    return Shortcut(_Counting(copy.deepcopy(net)), segs).requires_grad_(False)


def test_the_shortcut_is_frozen_in_training_and_inference_never_calls_it():
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**CFG)
    sc = _shortcut(net, sch, cfg)
    before = {k: v.clone() for k, v in sc.state_dict().items()}
    net_before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    train(net, shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=sc), TrainConfig(steps=3, lr=1e-2, progress=False))
    assert sc.net.calls == 3 * 3  # three jumps per training step
    assert all(torch.equal(before[k], v) for k, v in sc.state_dict().items())
    assert all(p.grad is None for p in sc.parameters())
    assert not torch.equal(net_before, torch.cat([p.detach().flatten() for p in net.parameters()]))
    x_T = torch.randn(6, 2, dtype=torch.float64)
    x0 = shortft.inference(net, sch, cfg, x_T)
    assert sc.net.calls == 9
    torch.testing.assert_close(x0, sample(net, sch, x_T, chain_timesteps(sch, cfg), 0.0)[0], rtol=0, atol=0)


def test_deterministic_under_a_seed():
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**{**CFG, "eta": 1.0})
    loss_fn = shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=_shortcut(net, sch, cfg))
    (l1, _, g1), (l2, _, g2), (l3, _, _) = _grad(loss_fn, net, 5), _grad(loss_fn, net, 5), _grad(loss_fn, net, 6)
    assert l1.item() == l2.item() and torch.equal(g1, g2) and l1.item() != l3.item()


def test_checkpointing_changes_nothing_but_memory():
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**CFG)
    sc = _shortcut(net, sch, cfg)
    _, _, g = _grad(shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=sc), net)
    _, _, g_ck = _grad(shortft.make_loss(sch, REWARD, shortft.ShortFTConfig(**CFG, checkpoint=True), shape=SHAPE,
                                         shortcut=sc), net)
    torch.testing.assert_close(g, g_ck, rtol=1e-12, atol=1e-14)


def test_bad_input_is_refused():
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**CFG)
    make = lambda **kw: shortft.make_loss(sch, kw.pop("reward", REWARD), kw.pop("cfg", cfg), shape=SHAPE, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="python -m minialign.shortcut"):
        make()
    with pytest.raises(ValueError, match="require grad"):
        make(shortcut=Shortcut(copy.deepcopy(net), {44: 29, 24: 14, 9: 4}))
    with pytest.raises(ValueError, match=r"need \[\(9, 4\)\]"):
        make(shortcut=Shortcut(copy.deepcopy(net), {44: 29, 24: 14}).requires_grad_(False))
    with pytest.raises(ValueError, match="not differentiable"):
        make(reward=jpeg_compressibility(), shortcut=_shortcut(net, sch, cfg))
    with pytest.raises(ValueError, match="share a timestep"):
        make(cfg=shortft.ShortFTConfig(batch=4, n_steps=3), shortcut=_shortcut(net, sch, cfg))
    for anchors in [(), (300, 600), (1000,), (5.0,)]:
        with pytest.raises(ValueError, match="anchors"):
            shortft.ShortFTConfig(anchors=anchors)
    with pytest.raises(ValueError, match="no segment starting at"):
        Shortcut(net, {44: 29})(torch.zeros(2, 2, dtype=torch.float64), torch.tensor([30, 30]))


def test_registered_and_built_with_the_shipped_shortcut():
    pytest.importorskip("safetensors")
    from minialign import shortcut as sc_mod
    from minialign.toy import store

    if not (store.DATA_DIR / "shortcut_gmm.safetensors").exists():
        pytest.skip("no shipped shortcut_gmm (python -m minialign.shortcut gmm)")
    base, sch, _ = store.load("gmm")
    m = methods.get("shortft")
    loss_fn, cfg = methods.build("shortft", sch, REWARD, shape=SHAPE, extra=m.extra("gmm"), batch=8)
    model = copy.deepcopy(base).requires_grad_(True)
    loss, stats = loss_fn(model, 0, torch.Generator().manual_seed(0))
    loss.backward()
    assert stats["graph_calls"] == 7.0 and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the shipped shortcut covers bench.py's 50-step chain and the paper's, and is closer to the teacher than
    # the base's own single DDIM step on every ShortFT segment (measured at distillation time, recorded)
    sc = sc_mod.load("gmm")
    for n, spacing, offset in [(20, "trailing", 0), (50, "trailing", 0), (50, "leading", 1)]:
        ts = chain_timesteps(sch, shortft.ShortFTConfig(n_steps=n, spacing=spacing, offset=offset))
        shortft.check_shortcut(sc, shortft.layout(ts, shortft.PAPER_ANCHORS, sch.T))
    for seg, f in sc.meta["fidelity"].items():
        if f["teacher_move_rms"] > 0.1:
            assert f["shortcut_rms"] < f["base_one_step_rms"], seg


def test_distillation_beats_the_base_one_step_jump_and_round_trips(tmp_path):
    from minialign import shortcut as sc_mod
    from minialign.toy import store

    if not (store.DATA_DIR / "gmm.safetensors").exists():
        pytest.skip("no shipped gmm base model")
    sc, meta = sc_mod.distil("gmm", steps=150, progress=False, pool=512, held_out=256, batch=256, lr=1e-3)
    moved = {seg: f for seg, f in meta["fidelity"].items() if f["teacher_move_rms"] > 0.15}
    assert moved and all(f["shortcut_rms"] < 0.5 * f["base_one_step_rms"] for f in moved.values()), moved
    store.save(sc.net, "shortcut_gmm", meta, tmp_path)
    back = sc_mod.load("gmm", tmp_path)
    assert back.segments == sc.segments and not any(p.requires_grad for p in back.parameters())
    x, t = torch.randn(4, 2), torch.full((4,), 449)
    torch.testing.assert_close(back(x, t), sc(x, t))
    with pytest.raises(ValueError, match="recipe"):
        sc_mod.distil("gmm", steps=1, poool=5)
    with pytest.raises(FileNotFoundError, match="python -m minialign.shortcut"):
        sc_mod.load("digits", tmp_path)


def test_few_step_loss_is_full_backprop_through_the_shortcut_sampler():
    from minialign.shortcut import few_step_loss

    net, sch = _toy()
    steps = (49, 29, 9)
    loss, _, g = _grad(few_step_loss(sch, REWARD, batch=4, shape=SHAPE, steps=steps), net)
    x_T, _ = draw_start(net, 4, SHAPE, None, torch.Generator().manual_seed(3))
    hand = -REWARD(sample(net, sch, x_T, list(steps), 0.0, plan_full(3))[0]).mean()
    torch.testing.assert_close(loss, hand, rtol=0, atol=0)
    g_h = torch.cat([x.flatten() for x in torch.autograd.grad(hand, list(net.parameters()))])
    torch.testing.assert_close(g, g_h, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="not differentiable"):
        few_step_loss(sch, jpeg_compressibility(), batch=4, shape=SHAPE)
