"""MIC: DAFormer plus masked image consistency — the teacher's pseudo-labels must also be predicted from
a block-masked, strongly augmented target view. Composed in as one extra target term, not a flag."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ssr_train.methods.contract import MethodSetup
from ssr_train.methods.daformer import DAFormer
from ssr_train.models.segmentor import segmentation_loss
from ssr_train.training.settings import setting
from ssr_train.uda.mic_mask import BlockMaskGenerator, block_size_for


@dataclass(frozen=True)
class MICConfig:
    """[mic]: configs/mic/gtaHR2csHR_mic_hrda.py (mask_block_size 64 at 1024 crops = 32 at 512)."""

    block_size: int = setting(32, "Mask block size at 512-pixel crops (scaled with the crop).", gt=0)
    mask_ratio: float = setting(0.7, "Expected masked fraction of the target view.", min=0.0, max=1.0)
    loss_weight: float = setting(1.0, "Weight of the masked-view loss.", min=0.0)


class MaskedImageConsistency:
    """CE of the student on a masked target view against the unmasked view's pseudo-labels."""

    def __init__(self, cfg: MICConfig) -> None:
        self.cfg = cfg
        self.masker: BlockMaskGenerator | None = None  # the block size follows the first crop seen

    def __call__(self, method: DAFormer, tgt_img: Tensor, pseudo_label: Tensor, pseudo_weight: Tensor,
                 log: dict) -> Tensor:
        if self.masker is None:
            self.masker = BlockMaskGenerator(self.cfg.mask_ratio,
                                             block_size_for(tgt_img.shape[-1], base=self.cfg.block_size))
        masked = self.masker.mask_image(method.strong_augment(tgt_img, blur=True), generator=method.generator)
        loss = self.cfg.loss_weight * segmentation_loss(method.model(masked), pseudo_label, pseudo_weight,
                                                        mean_over="all")
        log["loss_mic"] = loss
        return loss


class MIC(DAFormer):
    config_sections = {**DAFormer.config_sections, "mic": MICConfig}

    def __init__(self, setup: MethodSetup) -> None:
        super().__init__(setup, target_terms=(MaskedImageConsistency(setup.settings["mic"]),))
