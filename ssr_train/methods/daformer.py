"""DAFormer (DACS self-training with EMA teacher, ClassMix, FD, RCS) and MIC, each with SSR.

One iteration (the reference order):
  1. source:  CE(plain) + CE(SSR-enhanced)                                   [+ FD on thing classes]
  2. teacher: EMA of the student; pseudo-labels on the target view, one confidence weight
  3. mix:     ClassMix source onto target, colour jitter + blur; SAM tokens = the cached source and
              target features mixed with the same mask (online mode: SAM on the mixed image itself)
              CE(plain) + CE(enhanced) weighted by the mixed pixel weights
  4. MIC:     the teacher's pseudo-labels on a block-masked, strongly augmented target view
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ssr_train.methods.sam_features import SamFeatureSource
from ssr_train.methods.step_log import read_scalars
from ssr_train.models.segmentor import segmentation_loss, ssr_loss
from ssr_train.uda.classmix import classmix_masks, mix, mix_features, mixed_pixel_weight
from ssr_train.uda.ema import make_teacher, teacher_train_mode, update_ema
from ssr_train.uda.feature_distance import feature_distance_loss, imnet_features, make_imnet_model
from ssr_train.uda.mic_mask import BlockMaskGenerator, block_size_for
from ssr_train.uda.pseudo_label import pseudo_labels
from ssr_train.uda.strong_aug import strong_transform


class DAFormer(nn.Module):
    needs_target = True
    use_mic = False

    def __init__(self, model: nn.Module, cfg, *, sam_level: str | None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        u = cfg.uda
        self.teacher = make_teacher(model)
        self.imnet = make_imnet_model(model.backbone) if u.fd_lambda > 0 else None
        m = cfg.model
        self.sam = SamFeatureSource(sam_level, online=m.sam_source == "online", encoder_name=m.sam_encoder,
                                    checkpoint=m.sam_checkpoint, seed=m.sam_seed, device=cfg.run.device)
        # Each torchrun rank draws its own ClassMix / jitter / MIC masks.
        self.generator = torch.Generator().manual_seed(cfg.run.seed + 12345 + int(os.environ.get("RANK", "0")))
        self.masker = None
        self._step_count = 0

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        sd["_generator_state"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict, strict: bool = True):
        state_dict = dict(state_dict)
        gen = state_dict.pop("_generator_state", None)
        if gen is not None:
            self.generator.set_state(gen)
        return super().load_state_dict(state_dict, strict=strict)

    def export_model(self) -> nn.Module:
        return self.model

    def step(self, it: int, source: dict, target: dict | None = None) -> dict[str, float]:
        u = self.cfg.uda
        log: dict[str, torch.Tensor] = {}  # read back once, at the end
        # 2 (first, as DACS does): the EMA teacher follows the student of the previous iteration.
        update_ema(self.teacher, self.model, it, u.ema_alpha)

        # 1. source
        src_img, src_label = source["img"], source["label"]
        out = self.model.forward_train(src_img, sam=self.sam.source(source))
        src = ssr_loss(out, src_label, mean_over="all")
        loss = src["total"]
        log["loss_src"] = src["loss_plain"]
        if src["loss_enhanced"] is not None:
            log["loss_src_ssr"] = src["loss_enhanced"]
        if self.imnet is not None:
            fd = feature_distance_loss(out["feats"][-1], imnet_features(self.imnet, src_img), src_label,
                                       classes=u.fd_classes, scale_min_ratio=u.fd_scale_min_ratio,
                                       num_classes=self.cfg.model.num_classes, lambda_=u.fd_lambda)
            loss = loss + fd
            log["loss_fd"] = fd
        loss.backward()

        # 2. pseudo-labels on the target view
        tgt_img = target["img"]
        with torch.no_grad():
            teacher_train_mode(self.teacher)
            t_logits = self.teacher(tgt_img)
        pl, pw = pseudo_labels(t_logits, threshold=u.pseudo_threshold, ignore_top=u.pseudo_ignore_top,
                               ignore_bottom=u.pseudo_ignore_bottom, size=tuple(tgt_img.shape[2:]))
        log["pseudo_weight"] = pw.max()

        # 3. ClassMix + strong augmentation
        gen = self.generator
        mask = classmix_masks(src_label.cpu(), generator=gen).to(src_img.device)
        mix_img = mix(mask, src_img, tgt_img)
        mix_img = strong_transform(mix_img, generator=gen, color_jitter_s=u.color_jitter_strength,
                                   color_jitter_p=u.color_jitter_prob, blur=u.blur)
        mix_label = mix(mask, src_label, pl)
        mix_weight = mixed_pixel_weight(mask, pw)
        sam_mix = None
        if self.sam.enabled:
            sam_mix = self.sam.of_images(mix_img) if self.sam.online else \
                mix_features(mask, self.sam.cached(source), self.sam.cached(target))
        out_mix = self.model.forward_train(mix_img, sam=sam_mix)
        mixed = ssr_loss(out_mix, mix_label, mix_weight, mean_over="all")
        log["loss_mix"] = mixed["loss_plain"]
        if mixed["loss_enhanced"] is not None:
            log["loss_mix_ssr"] = mixed["loss_enhanced"]
        loss_tgt = mixed["total"]

        # 4. MIC: masked target view against the same pseudo-labels
        if self.use_mic:
            if self.masker is None:
                self.masker = BlockMaskGenerator(u.mic_mask_ratio, block_size_for(tgt_img.shape[-1],
                                                                                  base=u.mic_block_size))
            aug = strong_transform(tgt_img, generator=gen, color_jitter_s=u.color_jitter_strength,
                                   color_jitter_p=u.color_jitter_prob, blur=True)
            masked = self.masker.mask_image(aug, generator=gen)
            mic = u.mic_lambda * segmentation_loss(self.model(masked), pl, pw, mean_over="all")
            loss_tgt = loss_tgt + mic
            log["loss_mic"] = mic
        loss_tgt.backward()
        log["loss"] = loss.detach() + loss_tgt.detach()
        return read_scalars(log)


class MIC(DAFormer):
    use_mic = True
