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
from minialign.methods.shortcut import ExactJump, Shortcut
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
    with pytest.raises(ValueError, match="python -m minialign.methods.shortcut"):
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
    from minialign.methods import shortcut as sc_mod
    from minialign.toy import store

    if not (store.DATA_DIR / "shortcut_gmm.safetensors").exists():
        pytest.skip("no shipped shortcut_gmm (python -m minialign.methods.shortcut gmm)")
    base, sch, _ = store.load("gmm")
    loss_fn, cfg = methods.setup("shortft", sch, REWARD, shape=SHAPE, kind="toy", context={"model_name": "gmm"}, batch=8)
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
    from minialign.methods import shortcut as sc_mod
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
    with pytest.raises(FileNotFoundError, match="python -m minialign.methods.shortcut"):
        sc_mod.load("digits", tmp_path)


def test_few_step_loss_is_full_backprop_through_the_shortcut_sampler():
    from minialign.methods.shortcut import few_step_loss

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


# --- timestep-aware LoRA (T-LoRA) and progressive training --------------------------------------------------------

def _tlora_toy(mode="separate", progressive=0, seed=0):
    """The toy net with one LoRA per segment (B drawn non-zero, so every adapter changes the output)."""
    net, sch = _toy(seed=seed)
    frozen = copy.deepcopy(net).requires_grad_(False)
    cfg = shortft.ShortFTConfig(**CFG, tlora=mode, progressive=progressive)
    shortft.add_tlora(net, len(cfg.anchors), r=2)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net, sch, cfg, _exact(frozen, sch, cfg)


def _count_adapter_calls(net):
    """{adapter: [timesteps at which it ran]} via forward hooks on the first LoRA layer's lora_A modules."""
    seen, now = {}, {}
    layer = net.l1.lin
    net.register_forward_pre_hook(lambda m, args: now.update(t=int(args[1].flatten()[0])))
    for name, mod in layer.lora_A.items():
        mod.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(now["t"]))
    return seen


def test_tlora_routes_each_step_to_its_segment():
    ts = [49, 44, 39, 34, 29, 24, 19, 14, 9, 4]  # anchors snap to 49, 29, 14, 4
    sep = shortft.routes(ts, CFG["anchors"], 50, "separate")
    assert [sep[t] for t in ts] == [["seg0"]] * 4 + [["seg1"]] * 3 + [["seg2"]] * 2 + [["seg3"]]
    st = shortft.routes(ts, CFG["anchors"], 50, "stacked")
    assert st[49] == ["seg0", "seg1", "seg2", "seg3"] and st[24] == ["seg1", "seg2", "seg3"] and st[4] == ["seg3"]
    # a head before the first anchor joins segment 0
    assert shortft.routes(ts, (600, 300, 100), 50, "separate")[49] == ["seg0"]
    with pytest.raises(ValueError, match="mode"):
        shortft.routes(ts, CFG["anchors"], 50, "off")


@pytest.mark.parametrize("mode", ["separate", "stacked"])
def test_tlora_training_and_inference_call_the_routed_adapters(mode):
    net, sch, cfg, sc = _tlora_toy(mode)
    seen = _count_adapter_calls(net)
    loss_fn = shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=sc)
    loss, stats = loss_fn(net, 0, torch.Generator().manual_seed(3))
    table = shortft.routes(chain_timesteps(sch, cfg), cfg.anchors, sch.T, mode)
    # training: the base model runs only at the anchors (49, 29, 14, 4; the jumps are the frozen copy)
    want = {}
    for t in (49, 29, 14, 4):
        for a in table[t]:
            want.setdefault(a, []).append(t)
    assert seen == want, (seen, want)
    loss.backward()
    assert all(p.grad is not None and p.grad.norm() > 0 for n, p in net.named_parameters() if "lora_" in n)
    assert all(p.grad is None for n, p in net.named_parameters() if "lora_" not in n)  # the base stays frozen
    seen.clear()
    x_T = torch.randn(3, 2, dtype=torch.float64)
    x0 = shortft.inference(net, sch, cfg, x_T)
    want = {}
    for t in chain_timesteps(sch, cfg):
        for a in table[t]:
            want.setdefault(a, []).append(t)
    assert seen == want
    # oracle: a fixed copy per segment, each with only its adapters switched on, chained by hand
    from peft.tuners.tuners_utils import set_adapter
    copies = {}
    for t, names in table.items():
        key = tuple(names)
        if key not in copies:
            copies[key] = copy.deepcopy(net)
            set_adapter(copies[key], list(names))
    routed = lambda x, t, c: copies[tuple(table[int(t[0])])](x, t, c)  # noqa: E731
    with torch.no_grad():
        x0_o = sample(routed, sch, x_T, chain_timesteps(sch, cfg), 0.0)[0]
    torch.testing.assert_close(x0, x0_o, rtol=0, atol=0)
    assert not torch.equal(x0, sample(copies[tuple(table[4])], sch, x_T, chain_timesteps(sch, cfg), 0.0)[0])


def test_only_the_active_adapters_get_gradient():
    """Progressive stage with the last two anchors (14, 4): 'separate' trains seg2 and seg3 only; 'stacked' too
    (seg3 at t = 4, seg2 + seg3 at t = 14); the untrained segments' LoRAs get no gradient at all."""
    for mode in ("separate", "stacked"):
        net, sch, cfg, sc = _tlora_toy(mode, progressive=2)
        loss_fn = shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=sc)
        loss, stats = loss_fn(net, 2, torch.Generator().manual_seed(3))  # step 2: stage 1, anchors 14 and 4
        loss.backward()
        assert stats["anchors_trained"] == 2.0
        for n, p in net.named_parameters():
            if "lora_" in n:
                seg = n.split(".")[-2]
                if seg in ("seg2", "seg3"):
                    assert p.grad is not None and p.grad.norm() > 0, (mode, n)
                else:
                    assert p.grad is None, (mode, n)


def test_progressive_stages_start_at_the_stated_steps():
    assert [shortft.stage_anchors(s, 4, 3) for s in range(14)] == [3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0]
    assert [shortft.stage_anchors(s, 4, 0) for s in (0, 5, 100)] == [0, 0, 0]
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**CFG, progressive=3)
    loss_fn = shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=_exact(net, sch, cfg))
    got = [loss_fn(net, s, torch.Generator().manual_seed(3))[1] for s in (0, 2, 3, 6, 9, 50)]
    assert [g["anchors_trained"] for g in got] == [1, 1, 2, 3, 4, 4]
    assert [g["graph_calls"] for g in got] == [1, 1, 3, 5, 7, 7]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="progressive"):
            shortft.ShortFTConfig(progressive=bad)
    with pytest.raises(ValueError, match="tlora"):
        shortft.ShortFTConfig(tlora="yes")


@pytest.mark.parametrize("step, k", [(0, 1), (1, 3), (2, 6), (3, 10)])
def test_a_progressive_stage_with_the_exact_chain_is_draft_k(step, k):
    """Stages 0..3 start at the anchors 4, 14, 29, 49: with an exact shortcut, training from that anchor on is
    DRaFT-K with K = the steps from it to the data (1, 3, 6, 10; the last stage is full backprop)."""
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**CFG, progressive=1)
    _, _, g_s = _grad(lambda m, s, g: shortft.make_loss(sch, REWARD, cfg, shape=SHAPE,
                                                        shortcut=_exact(net, sch, cfg))(m, step, g), net)
    _, _, g_k = _grad(truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(batch=4, n_steps=10, k=k),
                                             shape=SHAPE), net)
    torch.testing.assert_close(g_s, g_k, rtol=1e-9, atol=1e-12)


def test_tlora_needs_its_adapters_and_trains_with_the_shortcut_frozen():
    net, sch = _toy()
    cfg = shortft.ShortFTConfig(**CFG, tlora="stacked")
    sc = _shortcut(net, sch, cfg)
    with pytest.raises(ValueError, match="add_tlora"):
        shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=sc)(net, 0, torch.Generator().manual_seed(0))
    shortft.add_tlora(net, 4, r=2)
    before = {k: v.clone() for k, v in sc.state_dict().items()}
    base_before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" not in n}
    train(net, shortft.make_loss(sch, REWARD, cfg, shape=SHAPE, shortcut=sc),
          TrainConfig(steps=2, lr=1e-2, progress=False))
    assert all(torch.equal(before[k], v) for k, v in sc.state_dict().items())
    assert all(torch.equal(base_before[n], p) for n, p in net.named_parameters() if "lora_" not in n)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in net.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match="n_segments"):
        shortft.add_tlora(net, 0)
