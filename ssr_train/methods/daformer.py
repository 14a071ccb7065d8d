"""DAFormer (DACS self-training with EMA teacher, ClassMix, FD, RCS), with SSR.

One iteration (the reference order):
  1. source:  CE(shadow) + CE(SSR-enhanced)                                  [+ FD on thing classes]
  2. teacher: EMA of the student; pseudo-labels on the target view, one confidence weight
  3. mix:     ClassMix source onto target, colour jitter + blur; SAM tokens of the mixed image
              CE(shadow) + CE(enhanced) weighted by the mixed pixel weights
  4. extra target terms composed in by a subclass (MIC: the masked target view), summed into step 3's loss
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssr_cache.errors import SSRError
from ssr_train.methods.contract import Method, MethodSetup, SourceDraw
from ssr_train.methods.step_log import read_scalars
from ssr_train.models.segmentor import ssr_loss
from ssr_train.training.settings import setting
from ssr_train.uda.classmix import classmix_masks, mix, mixed_pixel_weight
from ssr_train.uda.ema import make_teacher, teacher_train_mode, update_ema
from ssr_train.uda.feature_distance import feature_distance_loss, imnet_features, make_imnet_model
from ssr_train.uda.pseudo_label import pseudo_labels
from ssr_train.uda.rare_class_sampling import RareClassSampler
from ssr_train.uda.strong_aug import strong_transform


@dataclass(frozen=True)
class DAFormerConfig:
    """[daformer]: the DAFormer reference values (configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999)."""

    ema_alpha: float = setting(0.999, "EMA teacher momentum cap: min(1 - 1/(it+1), ema_alpha).", min=0.0, max=1.0)
    pseudo_threshold: float = setting(0.968, "Confidence a pseudo-label pixel must reach to count.",
                                      min=0.0, max=1.0)
    pseudo_ignore_top: int = setting(15, "Rows (of 512) of the target crop's top ignored.", min=0)
    pseudo_ignore_bottom: int = setting(120, "Rows (of 512) of the target crop's bottom ignored.", min=0)
    color_jitter_strength: float = setting(0.2, "Colour jitter strength s.", min=0.0)
    color_jitter_prob: float = setting(0.2, "Colour jitter is applied when u > this.", min=0.0, max=1.0)
    blur: bool = setting(True, "Gaussian blur in the strong augmentation.")
    fd_lambda: float = setting(0.005, "ImageNet feature-distance weight (0: off).", min=0.0)
    fd_classes: tuple[str, ...] | None = setting(None, "FD class names; default: the label space's thing "
                                                 "classes (none: FD off).", unique=True)
    fd_scale_min_ratio: float = setting(0.75, "Label downscale purity ratio for FD cells.", gt=0.0, max=1.0)
    rcs_temperature: float = setting(0.01, "Rare-class sampling temperature (0: uniform sampling).", min=0.0)
    rcs_min_pixels: int = setting(3000, "Pixels of a class an image needs to be drawn for it.", min=0)
    rcs_min_crop_ratio: float = setting(0.5, "Share of rcs_min_pixels a view needs to be drawn for the class.",
                                        min=0.0, max=1.0)


class DAFormer(Method):
    needs_target = True
    config_sections = {"daformer": DAFormerConfig}

    def __init__(self, setup: MethodSetup, *, target_terms: tuple = ()) -> None:
        super().__init__(setup)
        self.settings = c = setup.settings["daformer"]
        self.teacher = make_teacher(self.model)
        names = setup.label_space.thing_classes if c.fd_classes is None else c.fd_classes
        self.fd_classes = setup.label_space.indices(names)
        self.num_classes = setup.label_space.num_classes
        self.imnet = make_imnet_model(self.model.backbone) if c.fd_lambda > 0 and self.fd_classes else None
        self.target_terms = list(target_terms)  # extra losses on the target view (MIC), see step 4
        # Each torchrun rank draws its own ClassMix / jitter / MIC masks.
        self.generator = torch.Generator().manual_seed(setup.seed + 12345 + setup.rank)

    def source_sampler(self, store) -> SourceDraw | None:
        c = self.settings
        if not c.rcs_temperature:
            return None
        try:
            sampler = RareClassSampler.from_store(store, temperature=c.rcs_temperature, min_pixels=c.rcs_min_pixels,
                                                  min_crop_ratio=c.rcs_min_crop_ratio)
        except ValueError as exc:
            raise SSRError(f"rare-class sampling on {store.url}: {exc}") from None
        return sampler.draw

    def step(self, it: int, source: dict, target: dict | None = None) -> dict[str, float]:
        log: dict[str, Tensor] = {}  # read back once, at the end
        # 2 (first, as DACS does): the EMA teacher follows the student of the previous iteration.
        update_ema(self.teacher, self.model, it, alpha_max=self.settings.ema_alpha)
        loss_src = self._source_loss(source, log)
        self.backward(loss_src)
        pseudo_label, pseudo_weight = self._pseudo_labels(target["img"], log)
        loss_tgt = self._mixed_loss(source, target, pseudo_label, pseudo_weight, log)
        for term in self.target_terms:
            loss_tgt = loss_tgt + term(self, target["img"], pseudo_label, pseudo_weight, log)
        self.backward(loss_tgt)
        log["loss"] = loss_src.detach() + loss_tgt.detach()
        return read_scalars(log)

    def _source_loss(self, source: dict, log: dict) -> Tensor:
        """Step 1: CE of both branches on the source view, plus FD towards the ImageNet features."""
        c = self.settings
        out = self.model.forward_train(source["img"], sam=self.sam.source(source))
        src = ssr_loss(out, source["label"], mean_over="all")
        log["loss_src"] = src["loss_shadow"]
        if src["loss_enhanced"] is not None:
            log["loss_src_ssr"] = src["loss_enhanced"]
        loss = src["total"]
        if self.imnet is not None:
            fd = feature_distance_loss(out["feats"][-1], imnet_features(self.imnet, source["img"]),
                                       source["label"], classes=self.fd_classes,
                                       scale_min_ratio=c.fd_scale_min_ratio, num_classes=self.num_classes,
                                       lambda_=c.fd_lambda)
            loss = loss + fd
            log["loss_fd"] = fd
        return loss

    def _pseudo_labels(self, tgt_img: Tensor, log: dict) -> tuple[Tensor, Tensor]:
        """Step 2: the teacher's labels on the target view and the batch's one confidence weight."""
        c = self.settings
        with torch.no_grad():
            teacher_train_mode(self.teacher)
            t_logits = self.teacher(tgt_img)
        label, weight = pseudo_labels(t_logits, threshold=c.pseudo_threshold, ignore_top=c.pseudo_ignore_top,
                                      ignore_bottom=c.pseudo_ignore_bottom, size=tuple(tgt_img.shape[2:]))
        log["pseudo_weight"] = weight.max()
        return label, weight

    def strong_augment(self, img: Tensor, *, blur: bool) -> Tensor:
        c = self.settings
        return strong_transform(img, generator=self.generator, color_jitter_s=c.color_jitter_strength,
                                color_jitter_p=c.color_jitter_prob, blur=blur)

    def _mixed_loss(self, source: dict, target: dict, pseudo_label: Tensor, pseudo_weight: Tensor,
                    log: dict) -> Tensor:
        """Step 3: ClassMix of source onto target, strongly augmented, against the mixed labels."""
        src_img, src_label = source["img"], source["label"]
        mask = classmix_masks(src_label.cpu(), generator=self.generator).to(src_img.device)
        mix_img = self.strong_augment(mix(mask, src_img, target["img"]), blur=self.settings.blur)
        mix_label = mix(mask, src_label, pseudo_label)
        mix_weight = mixed_pixel_weight(mask, pseudo_weight)
        out = self.model.forward_train(mix_img, sam=self.sam.mixed(mask, source, target, mix_img))
        mixed = ssr_loss(out, mix_label, mix_weight, mean_over="all")
        log["loss_mix"] = mixed["loss_shadow"]
        if mixed["loss_enhanced"] is not None:
            log["loss_mix_ssr"] = mixed["loss_enhanced"]
        return mixed["total"]
