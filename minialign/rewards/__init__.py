"""Rewards with one signature, `reward(images, cond) -> Tensor[B]` (higher is better), and a
`differentiable` flag that gradient-based methods check (`require_differentiable`)."""
from .base import Reward, check_reward_graph, require_differentiable, reward_with_graph  # noqa: F401
from .digits import brightness, classifier_reward, jpeg_compressibility, symmetry  # noqa: F401
from .toy import component_log_density, target_region  # noqa: F401
