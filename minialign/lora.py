"""The one LoRA injector: peft adapters W + (alpha / r) B A on named layers of any torch module.

Used by the toy models (`add_lora`), ShortFT's timestep-aware adapters (one named adapter per segment) and the
Stable Diffusion UNet (`sd.add_lora`). Adapters start as the identity (B = 0), so the model is unchanged until
training; everything but the LoRA is frozen.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The full name of every Linear layer of `model` (the default targets). Full names, not last names: peft
    matches a target by suffix, and a last name such as "1" in a Sequential can also name a GroupNorm."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n)


def add_lora(model: torch.nn.Module, r: int = 4, target_modules=None, alpha: Optional[float] = None, seed: int = 0,
             adapter_name: str = "default", init: str | bool = True) -> list[torch.nn.Parameter]:
    """Inject one peft LoRA adapter `adapter_name` into `model` in place; freeze everything else.

    Returns the trainable (LoRA) parameters of every adapter the model now has. target_modules: names or suffixes of
    Linear/Conv2d layers (default: every Linear). init: peft's init_lora_weights (True = Kaiming A, "gaussian" =
    A ~ N(0, 1/r)); B = 0 either way. A second call with another adapter_name adds a second adapter.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
    if target_modules is None:
        target_modules = linear_layer_names(model)
    if not target_modules:
        raise ValueError("target_modules: the model has no Linear layer to adapt; name the layers explicitly")
    model.requires_grad_(False)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha or r, target_modules=list(target_modules), init_lora_weights=init)
    with warnings.catch_warnings():  # peft warns when a second named adapter joins a model: that is intended here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"target_modules={list(target_modules)} matched no layer of the model")
    for p in params:
        p.requires_grad_(True)
    return params
