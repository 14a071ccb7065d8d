"""The method contract: everything the training engine may ask of a UDA method, and nothing more.

A method is an nn.Module (its state_dict holds what it learns: student, EMA teacher, frozen ImageNet copy)
that the engine drives through these members only:

- `config_sections`: {section: dataclass} — the method's own settings and defaults (`[daformer]`, …);
  TrainConfig gathers them from the registry, so `--set daformer.pseudo_threshold=0.9` reaches them.
- `needs_target`: whether `step` needs a target batch (and so `--target-cache`).
- `source_sampler(store)`: how source views are drawn — None for uniform epochs, or a callable
  `draw(rng, n) -> view indices` (DAFormer: rare-class sampling).
- `step(it, source, target) -> {name: float}`: one iteration's forward and backward (the engine does the
  optimiser step); the names are the logged scalars, "loss" the total. Every backward goes through
  `self.backward(loss)`, which applies the engine's fp16 loss scale (training/loss_scaling.py).
- `shadow_model()`: the deployable SAM-free network (what model.pth and evaluation use).
- `random_state()` / `set_random_state(state)` / `reseed(seed)`: the method's own random stream (ClassMix,
  jitter, MIC masks). It is not in `state_dict` because it differs per torchrun rank while the weights do
  not: the engine gathers every rank's stream next to the global ones, so a resumed N-rank run continues
  each rank exactly.

Adding a method: one file with a `Method` subclass (and its config dataclass), one entry in
`ssr_train/methods/__init__.py`'s METHODS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ssr_cache.data.label_space import LabelSpace
from ssr_train.methods.sam_features import SamFeatureSource

SourceDraw = Callable[[np.random.Generator, int], np.ndarray]


@dataclass(frozen=True)
class MethodSetup:
    """What the engine hands a method: the student, where SAM tokens come from, the classes, the seeds."""

    model: nn.Module
    sam: SamFeatureSource
    label_space: LabelSpace
    settings: Mapping[str, Any]  # section name -> that section's config (TrainConfig.methods)
    seed: int
    rank: int = 0
    loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None  # the engine's (identity unless fp16)


class Method(nn.Module):
    needs_target: ClassVar[bool] = False
    config_sections: ClassVar[dict[str, type]] = {}

    def __init__(self, setup: MethodSetup) -> None:
        super().__init__()
        self.model = setup.model
        self.sam = setup.sam
        self.loss_scale = setup.loss_scale
        self.generator: torch.Generator | None = None

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one loss term (scaled first under fp16, so small gradients do not underflow)."""
        (loss if self.loss_scale is None else self.loss_scale(loss)).backward()

    def source_sampler(self, store) -> SourceDraw | None:
        return None

    def step(self, it: int, source: dict, target: dict | None) -> dict[str, float]:
        raise NotImplementedError

    def shadow_model(self) -> nn.Module:
        return self.model

    def random_state(self) -> torch.Tensor | None:
        return self.generator.get_state() if self.generator is not None else None

    def set_random_state(self, state: torch.Tensor | None) -> None:
        if self.generator is not None and state is not None:
            self.generator.set_state(state)

    def reseed(self, seed: int) -> None:
        if self.generator is not None:
            self.generator.manual_seed(seed)

    def load_state_dict(self, state_dict, strict: bool = True):
        # Checkpoints before the contract also saved rank 0's generator here; the per-rank copy wins.
        state_dict = {k: v for k, v in state_dict.items() if k != "_generator_state"}
        return super().load_state_dict(state_dict, strict=strict)
