"""Rewards with one signature, `reward(images, cond) -> Tensor[B]` (higher is better), and a
`differentiable` flag that gradient-based methods check (`require_differentiable`)."""
from minialign.rewards.base import Reward, check_reward_graph, require_differentiable, reward_with_graph  # noqa: F401
from minialign.rewards.digits import brightness, classifier_reward, jpeg_compressibility, symmetry  # noqa: F401
from minialign.rewards.toy import component_log_density, target_region  # noqa: F401
