"""SFT-PG on Stable Diffusion (issue 20 item 2): minialign.sd.sft_pg's data, scores and one short run on the shipped
mini-SD through build_sd("sft_pg") + train(); SFT-PG's chain ends where an SD 1.x pipeline ends."""
from pathlib import Path

import pytest
import torch

from minialign.sd import load_pipeline, mini_data, sft_pg as S

MINI = str(Path(__file__).resolve().parents[1] / "data" / "mini_sd")


def test_real_images_and_scores_read_the_prompt():
    """The prompt's real images: right digit (classifier) and colour; the score separates them from another prompt's
    images (an oracle: the wrong digit must score a larger feature MMD and SWD and a low digit accuracy)."""
    train, test = S.real_images("a red digit seven", "train"), S.real_images("a red digit seven", "test")
    assert train.shape[1:] == (3, 16, 16) and len(train) > 3 * len(test) > 0
    same = S.quality(train, "a red digit seven", test)
    other = S.quality(S.real_images("a red digit one", "train"), "a red digit seven", test)
    assert same["digit_accuracy"] > 0.9 and same["colour_accuracy"] == 1.0
    assert other["digit_accuracy"] < 0.1 and other["colour_accuracy"] == 1.0
    assert other["feature_mmd"] > same["feature_mmd"] + 0.1 and other["feature_swd"] > same["feature_swd"]
    assert S.real_images("a red digit seven", "test", size=32).shape[-1] == 32
    assert S.target_of("a white digit zero") == (0, list(mini_data.COLOURS).index("white"))
    with pytest.raises(ValueError, match="prompt must be one of mini-SD's captions"):
        S.real_images("a cat")


def test_one_short_run_on_mini_sd_trains_only_the_lora():
    """run(): 1 cycle (5 critic steps, 1 generator step), 4-step chain, CFG 3: every score of every sampler is finite,
    the LoRA moved and nothing else in the UNet did."""
    pipe = load_pipeline(MINI)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    res = S.run(pipe, "a red digit seven", seed=0, cycles=1, n_steps=4, batch=4, eval_n=12, lr=1e-3)
    for key in ("data_floor", "ddim_25", "ddim_50", "before", "after"):
        assert all(torch.isfinite(torch.tensor(v)) for v in res[key].values()), (key, res[key])
    assert res["steps"] == 6 and len(res["history"]) == 6 and res["config"]["eta"] == 1.0
    assert res["images"]["after"].shape == (12, 3, 16, 16)
    moved = {n for n, p in pipe.unet.named_parameters() if "lora_" not in n and not torch.equal(p, base[n.replace(".base_layer", "")])}
    assert not moved
    assert any(p.abs().max() > 0 for n, p in pipe.unet.named_parameters() if "lora_B" in n)
    assert "after" in S.format_row(res)
    with pytest.raises(ValueError, match="cycles"):
        S.run(pipe, "a red digit seven", cycles=0)


def test_sft_pg_chain_ends_at_the_pipelines_final_timestep():
    """On an SD 1.x scheduler (set_alpha_to_one=False) build_sd gives SFT-PG final_timestep 0, and its trained chain
    (SFTPG.sample) is the shared sampler's chain ending there: same draws, same x_0."""
    from diffusers import DDIMScheduler

    from minialign.methods.chain import chain_timesteps
    from minialign.sampling import sample
    from minialign.sd import SDDenoiser, schedule_from, tiny_pipeline
    from minialign.sd.build import batch_cond, build_sd, encode_images

    pipe = tiny_pipeline(0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)
    data = encode_images(pipe, torch.rand(4, 3, 16, 16) * 2 - 1)
    den, loss_fn, cfg = build_sd("sft_pg", pipe, None, ["a red digit seven"], data=data, batch=2, n_steps=3)
    assert cfg.final_timestep == 0
    module = loss_fn.bind(den)
    ours, _ = module.sample(2, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn((2, *data.shape[1:]), generator=g)
    ref, _ = sample(SDDenoiser(pipe), schedule_from(pipe), x_T, chain_timesteps(schedule_from(pipe), cfg), cfg.eta,
                    cond=batch_cond(pipe, ["a red digit seven"], 2), generator=g, min_sigma=cfg.min_sigma, final_timestep=0)
    torch.testing.assert_close(ours, ref)
