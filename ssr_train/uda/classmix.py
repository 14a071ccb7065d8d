"""ClassMix (DACS ``get_class_masks`` / ``one_mix``): paste half of the source classes onto the target.

Reference semantics (DAFormer / MIC ``get_class_masks``), the defaults here:

* the candidate classes are ``torch.unique`` of the whole source label *batch* (not of each image), and
  the ignore value 255 is a candidate like any class (choosing it pastes the source's unlabelled pixels,
  which stay ignored in the mixed label);
* ``ceil(n / 2)`` of the ``n`` candidates, i.e. ``int((n + n % 2) / 2)``, are drawn without replacement
  independently for every image; the mask of image i is the pixels of its label in those classes.

``per_image_classes=True`` draws from the classes of each image, ``exclude_ignore=True`` drops 255 from
the candidates (the DACS paper's description rather than the code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssr_cache.data.labels import IGNORE_INDEX


def _choose_half(classes: Tensor, generator: torch.Generator) -> Tensor:
    n = classes.numel()
    keep = (n + n % 2) // 2
    return classes[torch.randperm(n, generator=generator, device=generator.device)[:keep].to(classes.device)]


def classmix_masks(
    source_labels: Tensor,
    *,
    generator: torch.Generator,
    per_image_classes: bool = False,
    exclude_ignore: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Float 0/1 masks (B,1,H,W), 1 where the source pixel is pasted; labels are (B,H,W) or (B,1,H,W)."""
    labels = source_labels[:, 0] if source_labels.dim() == 4 else source_labels
    masks = []
    for label in labels:
        candidates = torch.unique(label if per_image_classes else labels)
        if exclude_ignore:
            candidates = candidates[candidates != ignore_index]
        chosen = _choose_half(candidates, generator)
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks).unsqueeze(1).float()


def mix(mask: Tensor, src: Tensor, tgt: Tensor) -> Tensor:
    """``mask * src + (1 - mask) * tgt`` for a 0/1 mask (B,1,H,W); keeps the dtype of ``src`` (labels stay
    integer). ``src``/``tgt`` are (B,C,H,W) images or (B,H,W) labels / weights."""
    m = mask.bool()
    if src.dim() == 3:
        m = m[:, 0]
    return torch.where(m, src, tgt)


def mixed_pixel_weight(mask: Tensor, pseudo_weight: Tensor) -> Tensor:
    """Pixel weight of a mixed sample: 1 on pasted source pixels, the pseudo-label weight elsewhere."""
    return mix(mask, torch.ones_like(pseudo_weight), pseudo_weight)


def mix_features(mask: Tensor, src_feat: Tensor, tgt_feat: Tensor) -> Tensor:
    """Mix two feature maps (B,C,g,g) with the mask resized to their grid by nearest interpolation.

    Stands in for running SAM on the mixed image: the cached SAM features of the two views are mixed.
    """
    small = F.interpolate(mask.float(), size=src_feat.shape[2:], mode="nearest")
    return mix(small, src_feat, tgt_feat)
