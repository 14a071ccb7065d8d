"""``ssr export``: the shadow branch as a self-contained ONNX or TorchScript file, and running one.

The exported graph takes what a camera gives — uint8 RGB (N, 3, H, W) — and does everything the Predictor
does in "whole" mode: keep-ratio resize to the training size, normalisation (``ssr_cache.image_norm``),
the segmentor, bilinear upsampling of the 1/4-resolution logits to (H, W), and (``output="labels"``) the
argmax as uint8 class indices (N, H, W); ``output="logits"`` gives float32 (N, C, H, W).

H and W are fixed at export (``size``) unless ``dynamic`` (ONNX only: TorchScript is traced, which fixes
every shape). The file carries its metadata — class names, palette, ignore value, input size, training
resize, mean/std, output kind — as ONNX ``metadata_props`` (key ``ssr``) or a TorchScript extra file
(``ssr.json``), so a deployment needs neither this package nor the run folder.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssr_cache.atomic_file import write_atomic
from ssr_cache.data.label_space import LabelSpace
from ssr_cache.errors import SSRError
from ssr_cache.image_norm import PIXEL_MEAN, PIXEL_STD
from ssr_train.infer.preprocess import check_resize, prepare
from ssr_train.infer.run_model import RunModel

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
OUTPUTS = ("labels", "logits")
METADATA_KEY, EXTRA_FILE = "ssr", "ssr.json"
INPUT_NAME = "images"
ONNX_OPSET = 18


class DeployModel(nn.Module):
    """uint8 (N, 3, H, W) RGB → uint8 labels (N, H, W) or float32 logits (N, C, H, W) at (H, W)."""

    def __init__(self, segmentor: nn.Module, resize: tuple[int, int], output: str = "labels") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise SSRError(f"--output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.segmentor, self.resize, self.output = segmentor.eval(), check_resize(resize), output

    def forward(self, images: Tensor) -> Tensor:
        img = prepare(images, self.resize)
        # Two steps, as mmseg's encode_decode and then its resize to the original (and the Predictor):
        # 1/4 → the resized input → the image's own size.
        logits = F.interpolate(self.segmentor(img).float(), size=(img.shape[2], img.shape[3]), mode="bilinear",
                               align_corners=False)
        logits = F.interpolate(logits, size=(images.shape[2], images.shape[3]), mode="bilinear",
                               align_corners=False)
        return logits if self.output == "logits" else logits.argmax(1).to(torch.uint8)


def export_metadata(run: RunModel, *, fmt: str, size: tuple[int, int] | None, output: str) -> dict:
    return {"format": fmt, "output": output, "input": "uint8 RGB (N, 3, H, W)",
            "input_size": None if size is None else list(size), "resize": list(run.resize),
            "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD), "label_space": run.label_space.to_dict(),
            "model": run.info}


def _onnx_bytes(model: DeployModel, example: Tensor, dynamic: bool, metadata: dict) -> bytes:
    import onnx  # optional dependency (the deploy extra): only export and ONNX inference need it

    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if dynamic:
        dims.update({2: torch.export.Dim("height", min=32, max=8192), 3: torch.export.Dim("width", min=32, max=8192)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[model.output], dynamic_shapes={"images": dims},
                                    opset_version=ONNX_OPSET, verbose=False, optimize=True)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _torchscript_bytes(model: DeployModel, example: Tensor, metadata: dict) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes becoming constants: intended here
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def export_model(run: RunModel, out: str | os.PathLike, *, fmt: str = "onnx", size: tuple[int, int] | None = None,
                 dynamic: bool = False, output: str = "labels") -> Path:
    """Write the shadow branch of ``run`` to ``out`` (atomically); ``size`` (W, H) defaults to the training
    resize. Returns the path."""
    if fmt not in FORMATS:
        raise SSRError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dynamic and fmt != "onnx":
        raise SSRError("--dynamic is for ONNX only: a TorchScript file is traced at one --size")
    out = Path(out)
    if out.is_dir():
        raise SSRError(f"--out {out} is a folder; give a file name such as {out / ('model' + FORMATS[fmt])}")
    width, height = check_resize(size or run.resize)
    model = DeployModel(run.model.float().cpu(), run.resize, output).eval()
    # batch 2: torch.export would fix a dimension of size 1 as a constant
    example = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metadata = export_metadata(run, fmt=fmt, size=None if dynamic else (width, height), output=output)
    with torch.inference_mode(False), torch.no_grad():
        data = (_onnx_bytes(model, example, dynamic, metadata) if fmt == "onnx"
                else _torchscript_bytes(model, example, metadata))
    return write_atomic(out, lambda handle: handle.write(data), what="the exported model")


class ExportedModel:
    """An exported file, run with onnxruntime (.onnx) or torch.jit (.pt), with its metadata."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SSRError(f"--model {self.path} does not exist")
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            self.metadata, self._run = self._load_onnx(threads)
        elif suffix in (".pt", ".ts", ".torchscript"):
            self.metadata, self._run = self._load_torchscript()
        else:
            raise SSRError(f"--model {self.path}: expected an exported .onnx or .pt file")
        try:
            self.label_space = LabelSpace.from_dict(self.metadata["label_space"])
            self.output = self.metadata["output"]
            size = self.metadata.get("input_size")
        except (KeyError, TypeError, SSRError):
            raise SSRError(f"{self.path} carries no ssr metadata: export it with `ssr export`") from None
        self.input_size = None if size is None else (int(size[0]), int(size[1]))

    def _load_onnx(self, threads):
        import onnxruntime as ort  # optional dependency (the deploy extra)

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            raise SSRError(f"cannot load {self.path} with onnxruntime: {str(exc).strip().splitlines()[0]}") from None
        metadata = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
        name = session.get_inputs()[0].name
        return metadata, lambda images: session.run(None, {name: images})[0]

    def _load_torchscript(self):
        extra = {EXTRA_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": still the way to run .pt
                module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra)
        except (RuntimeError, ValueError, OSError) as exc:
            raise SSRError(f"cannot load {self.path} as TorchScript: {str(exc).strip().splitlines()[0]}") from None
        metadata = json.loads(extra[EXTRA_FILE] or "{}")

        def run(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(images)).numpy()
        return metadata, run

    def check_size(self, width: int, height: int, what: str = "image") -> None:
        if self.input_size is not None and (width, height) != self.input_size:
            w, h = self.input_size
            raise SSRError(f"{self.path.name} was exported for {w}x{h} images, {what} is {width}x{height} "
                           f"(export again with --size {width}x{height}, or --dynamic for ONNX)")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, H, W) → the file's output (labels uint8 (N, H, W) or logits float32 (N, C, H, W))."""
        self.check_size(images.shape[3], images.shape[2])
        return self._run(np.ascontiguousarray(images))

    def labels(self, images: np.ndarray) -> np.ndarray:
        out = self(images)
        return out.argmax(1).astype(np.uint8) if self.output == "logits" else out.astype(np.uint8)
