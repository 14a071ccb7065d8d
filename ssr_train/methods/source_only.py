"""Source-only training: CE on labelled source views (+ CE on SSR-enhanced features when SSR is on)."""

from __future__ import annotations

from ssr_train.methods.contract import Method
from ssr_train.methods.step_log import read_scalars
from ssr_train.models.segmentor import ssr_loss


class SourceOnly(Method):
    """The student alone; `step` returns the losses of one iteration (backward done inside)."""

    def step(self, it: int, source: dict, target: dict | None = None) -> dict[str, float]:
        out = self.model.forward_train(source["img"], sam=self.sam.source(source))
        losses = ssr_loss(out, source["label"], mean_over="all")
        self.backward(losses["total"])
        log = {"loss": losses["total"], "loss_src": losses["loss_shadow"]}
        if losses["loss_enhanced"] is not None:
            log["loss_src_ssr"] = losses["loss_enhanced"]
        return read_scalars(log)
