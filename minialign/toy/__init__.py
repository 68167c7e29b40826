"""Toy diffusion models: 2-D point clouds (MLP) and scikit-learn's 8x8 digits (conv UNet)."""
from minialign.toy.data import gaussian_mixture, load_2d, load_digits_tensors, swiss_roll  # noqa: F401
from minialign.toy.models import DigitsClassifier, DigitsUNet, MLPDenoiser  # noqa: F401
from minialign.toy.store import load  # noqa: F401
