"""Reward fine-tuning methods, one file each, on top of the shared sampler (minialign.sampling).

Every method is a choice of which sampling steps keep a graph and how the pieces become a loss; each
file has a config dataclass (the notebook's knobs) and returns `loss_fn(model, step, generator) ->
(loss, stats)` for minialign.train.train.

    ddpo          policy gradient (PPO-clip) on the denoising MDP; any reward (Black et al. 2023)
    full_bp       backprop through every step: the exact pathwise gradient
    truncated_bp  DRaFT-K, DRaFT-LV (Clark et al. 2023), AlignProp (Prabhudesai et al. 2023)
    refl          one graph step at a random late timestep, reward on x0_hat (Xu et al. 2023)
    sft_pg        shortcut fine-tuning with policy gradient against a learned critic (Fan & Lee 2023)

Import the submodules directly: `from minialign.methods import full_bp`.
"""
