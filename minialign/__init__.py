"""minialign: reward fine-tuning of diffusion models through (or around) their sampling chain."""
from minialign.sampling import (  # noqa: F401
    StepPlan, Trajectory, plan_full, plan_none, plan_one_step, plan_truncated, predict_x0, sample,
    transition_log_prob,
)
from minialign.schedule import Schedule, q_sample, step_coefficients, timesteps  # noqa: F401

__version__ = "0.1.0"
