"""One batch of views on its way from the decoding workers, through the encoder, to the writer threads,
without the host waiting for a GPU in between.

Why: each wait empties the GPU's queue, and the GPU then sits idle while the main thread gathers, pins and
copies up the next batch. A batch used to wait at the blocking copy of its pixels, inside the encoder (the
normalisation constants and every attention block's position index were copied up afresh: image_norm.py,
sam_rel_pos.py), at the finite check of its features and at the copy of its features back. Now the pixels
go up from pinned memory without waiting, the features are cast or quantised and checked on the GPU and
come back into pinned memory behind an event, and the build queues batch k + 1 before it waits for batch
k's copy (`pending` in pipeline.py), so the GPU computes k + 1 while the host checks and hands over k.
On a CPU every step simply runs in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssr_cache.store.feature_codec import check_encoded_features, encode_features_unchecked


class HostCopy:
    """Tensors on their way to host memory: pinned buffers filled behind an event on a GPU; on the CPU the
    tensors themselves. `wait()` returns them as numpy arrays."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.event = None
        devices = {t.device for t in tensors.values()}
        if all(d.type == "cpu" for d in devices):
            self.tensors = tensors
            return
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            where = sorted(map(str, devices))
            raise ValueError(f"HostCopy takes tensors of the CPU or of one CUDA device, not {where}")
        device = next(iter(devices))
        self.tensors = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                        for k, t in tensors.items()}
        # blocking: the waiting main thread sleeps instead of spinning, leaving its core to workers and writers
        self.event = torch.cuda.Event(blocking=True)
        self.event.record(torch.cuda.current_stream(device))

    def wait(self) -> dict[str, np.ndarray]:
        if self.event is None:
            return {k: t.numpy() for k, t in self.tensors.items()}
        self.event.synchronize()
        # Copied out (as `.cpu()` would), so the pinned buffers go back to torch's pinned-memory cache for the
        # next batch: a few batches' worth stays pinned, not every batch the writer queue holds.
        out = {k: t.numpy().copy() for k, t in self.tensors.items()}
        self.tensors = {}
        return out


def pixels_to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch's pixels on `device`. For a GPU through pinned memory, whose copy up does not make the host
    wait; torch's pinned-memory cache reuses that buffer once the copy is done."""
    if device.type != "cuda":
        return pixels
    return pixels.pin_memory().to(device, non_blocking=True)


@dataclass(eq=False)
class EncodedBatch:
    """A batch whose features are on their way to the host; `stored_arrays` waits for them."""

    views: np.ndarray
    pixels: torch.Tensor  # the workers' shared memory (or a join of it), as are labels and counts
    labels: torch.Tensor
    counts: torch.Tensor
    feature_dtype: str
    features: HostCopy
    checks: HostCopy

    @classmethod
    def launch(cls, encoder, group: list[dict], levels: tuple[int, ...], amp, feature_dtype: str) -> EncodedBatch:
        """Queue the encoder (and the cast or quantisation) for a batch of per-image items and the copy of
        its stored features to the host; on a GPU this returns before any of it has run."""
        views = np.concatenate([np.asarray(g["views"]) for g in group])
        pixels = joined([g["pixels"] for g in group])
        feats = encoder.encode(pixels_to_device(pixels, encoder.device), levels=levels, autocast_dtype=amp)
        stored, checks = {}, {}
        for name, x in feats.items():
            stored_level, checks[name] = encode_features_unchecked(name, x, feature_dtype)
            stored.update(stored_level)
        return cls(views=views, pixels=pixels, labels=joined([g["labels"] for g in group]),
                   counts=joined([g["counts"] for g in group]), feature_dtype=feature_dtype,
                   features=HostCopy(stored), checks=HostCopy(checks))

    def stored_arrays(self, store) -> dict[str, np.ndarray]:
        """{array path: values} for the writers (`FeatureStore.stored_arrays`), once the features are on the
        host; features with NaN/Inf (or beyond float16) are refused with one line naming the views."""
        where = f"views {int(self.views.min())}-{int(self.views.max())}"
        for name, check in self.checks.wait().items():
            check_encoded_features(name, check, self.feature_dtype, where)
        return store.stored_arrays(len(self.views), pixels=self.pixels.numpy(), labels=self.labels.numpy(),
                                   class_counts=self.counts.numpy(), encoded_features=self.features.wait())


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """One batch tensor from per-image items (no copy for a batch of one image's views)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
