"""Source-only training: CE on labelled source views (+ CE on SSR-enhanced features when SSR is on)."""

from __future__ import annotations

from torch import nn

from ssr_train.methods.sam_features import SamFeatureSource
from ssr_train.methods.step_log import read_scalars
from ssr_train.models.segmentor import ssr_loss


class SourceOnly(nn.Module):
    """Holds the student model; `step` returns the losses of one iteration (backward done inside)."""

    needs_target = False

    def __init__(self, model: nn.Module, cfg, *, sam_level: str | None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        m = cfg.model
        self.sam = SamFeatureSource(sam_level, online=m.sam_source == "online", encoder_name=m.sam_encoder,
                                    checkpoint=m.sam_checkpoint, seed=m.sam_seed, device=cfg.run.device)

    def step(self, it: int, source: dict, target: dict | None = None) -> dict[str, float]:
        out = self.model.forward_train(source["img"], sam=self.sam.source(source))
        losses = ssr_loss(out, source["label"], mean_over="all")
        losses["total"].backward()
        log = {"loss": losses["total"], "loss_src": losses["loss_plain"]}
        if losses["loss_enhanced"] is not None:
            log["loss_src_ssr"] = losses["loss_enhanced"]
        return read_scalars(log)

    def export_model(self) -> nn.Module:
        return self.model
