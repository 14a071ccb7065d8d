"""The SAM feature cache on disk: one Zarr v3 group holding planned views, their crops and frozen-SAM features.

Every per-view array has one chunk per view (a training read touches exactly one chunk per array) and
one shard per `views_per_shard` views (so a cache of 25k views is a few thousand files, not millions).
A shard is the unit of building: `write_shard` writes every array's shard for a range of views, then that
range's done flags. The layout is specified in docs/cache-format.md.

Crash safety (SIGKILL at any moment): a shard's done flags are cleared before, and set only after, all of
its data is written, so a done flag never sits on missing, partial or stale data. Flag chunks carry a
crc32c, so even a torn flag file reads as "not done". On top of that, every local file is written under a
temporary name and renamed into place (ours as zarr's LocalStore does), and object stores (s3, gs) put
whole objects, so no reader ever sees a half-written file. Not covered:
power loss (nothing is fsync'ed, so the OS may persist a flag file before the data it vouches for).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ssr_cache import __version__
from ssr_cache.build.view_plan import VIEW_COLUMNS
from ssr_cache.data.label_space import CITYSCAPES, LabelSpace
from ssr_cache.data.labels import IGNORE_INDEX
from ssr_cache.errors import SSRError
from ssr_cache.store.direct_write import write_direct
from ssr_cache.store.feature_codec import (
    FEATURE_DTYPES,
    dequantize_int8,
    encode_features,
    feature_compressors,
    flag_compressors,
    lossless_compressors,
)
from ssr_cache.store.feature_levels import level_name, parse_level
from ssr_cache.store.shard_codec import ShardEncoder

# 2: crops by cv2 INTER_LINEAR (view_plan.CROP_DEFINITION), no interm features, no per-view domain column,
#    SAM precision in the fingerprint. Caches of another format are refused, never misread.
FORMAT_VERSION = 2
FORMAT_KEY = "ssr_cache_format"

DONE = "done"
IMAGE_CLASS_COUNTS = "image_class_counts"  # (n_samples, num_classes), written at creation (labelled sources)
CREATING_MARKER = "ssr-creating.json"  # see FeatureStore.create
RESERVED_ATTRS = (FORMAT_KEY, "state", "ssr_version", "fingerprint", "layout",
                  "sample_ids", "view_columns", "views_per_shard", "n_views", "feature_dtype")


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of a cache. `levels` are feature grid sizes (stored largest first, see feature_levels)."""

    n_views: int
    crop_hw: tuple[int, int]
    channels: int = 256
    levels: tuple[int, ...] = (64, 32, 16)
    feature_dtype: str = "float16"
    views_per_shard: int = 64
    num_classes: int = CITYSCAPES.num_classes  # the build passes its label space's

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "n_views", int(self.n_views))
        put(self, "crop_hw", tuple(int(v) for v in self.crop_hw))
        put(self, "levels", tuple(sorted({parse_level(g) for g in self.levels}, reverse=True)))
        if self.n_views < 1:
            raise SSRError(f"a cache needs at least one view, got n_views={self.n_views}")
        if len(self.crop_hw) != 2 or min(self.crop_hw) < 1:
            raise SSRError(f"crop must be two positive sizes, got {self.crop_hw}")
        if self.views_per_shard < 1:
            raise SSRError(f"views_per_shard must be >= 1, got {self.views_per_shard}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise SSRError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.feature_dtype!r}")
        if not self.levels:
            raise SSRError("a cache needs at least one feature level")

    @property
    def n_shards(self) -> int:
        return -(-self.n_views // self.views_per_shard)

    @property
    def shard_views(self) -> int:
        """Views per shard as stored (a cache smaller than one shard has one shard of n_views)."""
        return min(self.views_per_shard, self.n_views)

    def shard_range(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.n_shards})")
        start = shard * self.views_per_shard
        return start, min(start + self.views_per_shard, self.n_views)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(level_name(g) for g in self.levels)

    def feature_shape(self, name: str) -> tuple[int, int, int]:
        """(channels, grid, grid) of one view's feature map `name`."""
        if name not in self.feature_names:
            raise KeyError(name)
        g = parse_level(name)
        return (self.channels, g, g)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crop_hw"], d["levels"] = list(self.crop_hw), list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StoreLayout:
        return cls(**{**d, "crop_hw": tuple(d["crop_hw"]), "levels": tuple(d["levels"])})


@dataclass(frozen=True)
class ArraySpec:
    """What one stored array must look like. `per_view`: one chunk per view, one shard per views_per_shard."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    fill_value: int | float | bool
    dims: tuple[str, ...]
    per_view: bool


def array_specs(layout: StoreLayout, view_columns: dict[str, tuple[str, tuple[int, ...]]] | None = None
                ) -> dict[str, ArraySpec]:
    """Every array of a cache with this layout, by path in the group."""
    n, vps = layout.n_views, layout.shard_views
    h, w = layout.crop_hw
    specs: dict[str, ArraySpec] = {}
    for col, (dtype, tail) in (view_columns or VIEW_COLUMNS).items():
        dims = ("view",) + tuple(f"{col}_{i}" for i in range(len(tail)))
        specs[f"views/{col}"] = ArraySpec((n, *tail), dtype, (n, *tail), None, 0, dims, False)
    specs[DONE] = ArraySpec((n,), "bool", (vps,), None, False, ("view",), False)

    def per_view(tail: tuple[int, ...], dtype: str, fill, dims: tuple[str, ...]) -> ArraySpec:
        return ArraySpec((n, *tail), dtype, (1, *tail), (vps, *tail), fill, ("view", *dims), True)

    specs["pixels"] = per_view((h, w, 3), "uint8", 0, ("y", "x", "rgb"))
    specs["labels"] = per_view((h, w), "uint8", IGNORE_INDEX, ("y", "x"))
    specs["class_counts"] = per_view((layout.num_classes,), "int32", 0, ("class",))
    for name in layout.feature_names:
        shape = layout.feature_shape(name)
        stored = "float16" if layout.feature_dtype == "float16" else "uint8"
        specs[f"features/{name}"] = per_view(shape, stored, 0, ("channel", "y", "x"))
        if layout.feature_dtype == "int8":
            for part in ("scale", "offset"):
                specs[f"features/{name}_{part}"] = per_view(shape[:1], "float32", 0, ("channel",))
    return specs


# ---------------------------------------------------------------- URLs


def local_path_of(url: str | Path) -> Path | None:
    """The directory of a local cache URL (plain path or file://), None for remote URLs."""
    url = str(url)
    if "://" not in url:
        return Path(url).expanduser()
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None


def open_zarr_store(url: str | Path, *, read_only: bool):
    """(zarr store, local path or None). Local paths use LocalStore (atomic temp+rename writes); other
    URLs go through fsspec, so memory://, s3:// and gs:// work when their backend is installed."""
    local = local_path_of(url)
    if local is not None:
        return zarr.storage.LocalStore(local, read_only=read_only), local
    try:
        return zarr.storage.FsspecStore.from_url(str(url), read_only=read_only), None
    except ImportError as exc:
        raise SSRError(f"cannot open {url}: {exc} (install the fsspec backend for this URL scheme)") from None
    except ValueError as exc:
        raise SSRError(f"cannot open {url}: {exc}") from None


def store_exists(url: str | Path) -> bool:
    """True when anything is at `url` (a cache, another store, a file, a non-empty directory):
    exactly the cases where `FeatureStore.create` needs overwrite=True or refuses."""
    local = local_path_of(url)
    if local is not None:
        return local.is_file() or (local.is_dir() and any(local.iterdir()))
    store, _ = open_zarr_store(url, read_only=True)
    return not sync(store.is_empty(""))


def store_state(url: str | Path) -> str:
    """What is at `url`: "absent" (nothing, or an empty folder), "ready" (an ssr cache, any format),
    "unfinished" (a creation this tool started and never completed: safe to replace), or "foreign"."""
    if not store_exists(url):
        return "absent"
    store, local = open_zarr_store(url, read_only=True)
    try:
        attrs = zarr.open_group(store, mode="r").attrs
        if FORMAT_KEY in attrs:
            return "ready" if attrs.get("state") == "ready" else "unfinished"
    except Exception:  # noqa: BLE001 - anything that does not open as a Zarr group is not a ready cache
        pass
    if sync(store.exists(CREATING_MARKER)):
        return "unfinished"
    # A kill while the marker itself was being written leaves only the writer's temp file of it.
    stem = CREATING_MARKER.split(".")[0]
    if local is not None and any(p.name.startswith(stem + ".") for p in local.iterdir()):
        return "unfinished"
    return "foreign"


def _clear_all_but_marker(store, local: Path | None) -> None:
    if local is not None:
        for child in local.iterdir():
            if child.name == CREATING_MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        return

    async def keys() -> list[str]:
        return [k async for k in store.list()]

    for key in sync(keys()):
        if key != CREATING_MARKER:
            sync(store.delete(key))


def _to_json(what: str, value: dict) -> dict:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


# ---------------------------------------------------------------- the store


class FeatureStore:
    """An opened cache. Use `FeatureStore.create(...)` or `FeatureStore.open(url, mode)`."""

    def __init__(self, url: str, group: zarr.Group, *, local_path: Path | None, writable: bool,
                 direct_io: bool = False):
        self.url = url
        self.group = group
        self.local_path = local_path
        self.writable = writable
        self.direct_io = direct_io  # shard files past the page cache, where offered (direct_write.py)
        self.attrs: dict = dict(group.attrs)
        self.layout = StoreLayout.from_dict(self.attrs["layout"])
        self.fingerprint: dict = self.attrs["fingerprint"]
        self.sample_ids: list[str] = list(self.attrs["sample_ids"])
        self.view_columns = {k: (v[0], tuple(v[1])) for k, v in self.attrs["view_columns"].items()}
        self.specs = array_specs(self.layout, self.view_columns)
        self._arrays: dict[str, zarr.Array] = {}
        self._shard_encoders: dict[str, ShardEncoder | None] = {}

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, n_views={self.n_views}, levels={self.layout.levels})"

    # ------------------------------------------------------------ create / open

    @classmethod
    def create(cls, url: str | Path, layout: StoreLayout, view_arrays: dict[str, np.ndarray], sample_ids,
               fingerprint: dict, *, overwrite: bool = False, extra_attrs: dict | None = None,
               image_class_counts: np.ndarray | None = None) -> FeatureStore:
        """Write an empty cache (view table filled, nothing done). Refuses an existing cache unless
        `overwrite`, and never deletes anything that is not an ssr cache. `image_class_counts`
        ((n_samples, num_classes) ints, labelled sources): each image's full-resolution class pixels."""
        url = str(url)
        sample_ids = [str(s) for s in sample_ids]
        columns, view_columns = _check_view_arrays(view_arrays, layout.n_views, len(sample_ids))
        fingerprint = _to_json("fingerprint", fingerprint)
        extra = _to_json("extra_attrs", extra_attrs or {})
        clash = sorted(set(extra) & set(RESERVED_ATTRS))
        if clash:
            raise ValueError(f"extra_attrs may not set reserved attributes {clash}")

        state = store_state(url)
        if state == "foreign":
            raise SSRError(f"{url} exists and is not an ssr cache; refusing to write there")
        if state == "ready" and not overwrite:
            raise SSRError(f"a cache already exists at {url} (use --overwrite to replace it)")
        store, local = open_zarr_store(url, read_only=False)
        # The marker goes first and leaves last: until the cache is ready, the folder is recognisably ours,
        # so a re-run (or --overwrite) may replace it whatever moment the creation was interrupted at.
        sync(store.set(CREATING_MARKER, default_buffer_prototype().buffer.from_bytes(
            json.dumps({"ssr_version": __version__}).encode())))
        if state != "absent":
            _clear_all_but_marker(store, local)

        attrs = {
            FORMAT_KEY: FORMAT_VERSION,
            "state": "creating",  # flipped to "ready" last, so an interrupted create is recognisable
            "ssr_version": __version__,
            "fingerprint": fingerprint,
            "layout": layout.to_dict(),
            "n_views": layout.n_views,
            "views_per_shard": layout.views_per_shard,
            "feature_dtype": layout.feature_dtype,
            "view_columns": {k: [dt, list(tail)] for k, (dt, tail) in view_columns.items()},
            "sample_ids": sample_ids,
            **extra,
        }
        root = zarr.create_group(store, attributes=attrs)
        root.create_group("views")
        root.create_group("features")
        for path, spec in array_specs(layout, view_columns).items():
            arr = root.create_array(path, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks,
                                    shards=spec.shards, fill_value=spec.fill_value,
                                    compressors=_compressors_for(path, spec, layout),
                                    dimension_names=spec.dims,
                                    config={"write_empty_chunks": path != DONE})
            if path.startswith("views/"):
                arr[...] = columns[path.split("/", 1)[1]]
        if image_class_counts is not None:
            counts = _checked_counts(image_class_counts, (len(sample_ids), layout.num_classes))
            root.create_array(IMAGE_CLASS_COUNTS, data=counts, chunks=counts.shape,
                              dimension_names=("sample", "class"))
        root.update_attributes({"state": "ready"})
        sync(store.delete(CREATING_MARKER))
        return cls.open(url, mode="r+")

    @classmethod
    def open(cls, url: str | Path, mode: str = "r", *, direct_io: bool = False) -> FeatureStore:
        """Open an existing cache; "r" read-only, "r+" to write shards (with `direct_io`, the local shard
        files a build writes bypass the page cache where the filesystem offers O_DIRECT)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        url = str(url)
        local = local_path_of(url)
        if local is not None and not local.is_dir():  # checked first: a writable LocalStore would mkdir it
            raise SSRError(f"{url} holds no ssr cache")
        store, local = open_zarr_store(url, read_only=mode == "r")
        try:
            group = zarr.open_group(store, mode=mode)
        except Exception:
            what = "is not an ssr cache" if store_exists(url) else "holds no ssr cache"
            raise SSRError(f"{url} {what}") from None
        attrs = group.attrs
        if FORMAT_KEY not in attrs:
            raise SSRError(f"{url} is a Zarr store but not an ssr cache")
        if attrs[FORMAT_KEY] > FORMAT_VERSION:
            raise SSRError(f"{url} has cache format {attrs[FORMAT_KEY]}, newer than this ssr reads "
                           f"({FORMAT_VERSION}); upgrade ssr")
        if attrs[FORMAT_KEY] < FORMAT_VERSION:
            raise SSRError(f"{url} has cache format {attrs[FORMAT_KEY]}, written by an older ssr whose crops this "
                           f"one cannot reproduce (format {FORMAT_VERSION}); rebuild it with `ssr cache build "
                           f"… --overwrite`")
        if attrs.get("state") != "ready":
            raise SSRError(f"{url} was not fully created (interrupted?); re-run the build command to finish it")
        return cls(url, group, local_path=local, writable=mode == "r+", direct_io=direct_io)

    # ------------------------------------------------------------ table + progress

    @property
    def n_views(self) -> int:
        return self.layout.n_views

    @property
    def n_shards(self) -> int:
        return self.layout.n_shards

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.layout.feature_names

    def shard_range(self, shard: int) -> tuple[int, int]:
        return self.layout.shard_range(shard)

    def shard_of(self, view: int) -> int:
        return view // self.layout.views_per_shard

    # ------------------------------------------------------------ typed facts (read these, not attributes)

    @property
    def dataset(self) -> str:
        return str(self.fingerprint["dataset"])

    @property
    def split(self) -> str:
        return str(self.fingerprint["split"])

    @property
    def labelled(self) -> bool:
        """Whether the stored label crops are real labels (a source; it may also serve as a target).
        Caches written before the flag existed: labelled exactly when built as the source domain."""
        if "labelled" in self.fingerprint:
            return bool(self.fingerprint["labelled"])
        return int(self.fingerprint.get("domain", 1)) == 0

    @property
    def label_space(self) -> LabelSpace:
        """The classes the stored labels index (older caches: Cityscapes' 19)."""
        stored = self.fingerprint.get("label_space")
        return LabelSpace.from_dict(stored) if stored else CITYSCAPES

    @property
    def precision(self) -> str:
        """The precision SAM ran in when the cache was built: "bf16", "fp16" or "fp32" (`--autocast`)."""
        return str(self.fingerprint.get("precision", "unrecorded"))

    @property
    def resize(self) -> tuple[int, int]:
        """(W, H) the images were rescaled to (keep-ratio, mmcv imrescale) before cropping."""
        w, h = self.fingerprint["plan"]["resize"]
        return int(w), int(h)

    @property
    def data_root(self) -> Path | None:
        """The dataset root the cache was built from, as recorded by the build."""
        root = (self.attrs.get("build_config") or {}).get("data_root")
        return Path(root) if root else None

    def class_counts(self) -> np.ndarray:
        """(n_views, num_classes) int: labelled pixels of each class in each stored view crop."""
        return np.asarray(self.array("class_counts")[...])

    def image_class_counts(self) -> np.ndarray | None:
        """(n_samples, num_classes) int: each source image's class pixels at full resolution, recorded at
        build time (rare-class sampling's eligibility); None for targets and caches built before it."""
        if IMAGE_CLASS_COUNTS not in self.group:
            return None
        return np.asarray(self.group[IMAGE_CLASS_COUNTS][...])

    def array(self, path: str) -> zarr.Array:
        """The zarr array at `path` (e.g. "features/l64"), opened once."""
        if path not in self._arrays:
            try:
                arr = self.group[path]
            except KeyError:
                raise SSRError(f"{self.url} is damaged: array {path} is missing") from None
            if self.writable and path != DONE:
                # every view gets a physical chunk, even a constant one, so verify can tell written from missing
                arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[path] = arr
        return self._arrays[path]

    def view_arrays(self) -> dict[str, np.ndarray]:
        return {col: self.array(f"views/{col}")[...] for col in self.view_columns}

    def done_mask(self) -> np.ndarray:
        """(n_views,) bool. A flag chunk that cannot be read or fails its checksum counts as not done."""
        done = self.array(DONE)
        try:
            return np.asarray(done[...], dtype=bool)
        except (ValueError, RuntimeError):
            pass
        mask = np.zeros(self.n_views, dtype=bool)
        for s in range(self.n_shards):
            a, b = self.shard_range(s)
            try:
                mask[a:b] = done[a:b]
            except (ValueError, RuntimeError):
                pass
        return mask

    def pending_shards(self) -> list[int]:
        mask = self.done_mask()
        return [s for s in range(self.n_shards) if not mask[slice(*self.shard_range(s))].all()]

    # ------------------------------------------------------------ writing

    def write_shard(self, shard: int, *, pixels: np.ndarray, labels: np.ndarray, class_counts: np.ndarray,
                    features: dict | None = None, encoded_features: dict | None = None) -> None:
        """Write every array's region for the views of `shard`, then (last) their done flags.

        pixels (n,H,W,3) uint8, labels (n,H,W) uint8, class_counts (n,num_classes) ints, and either
        features {name: float (n,C,g,g)} for every name in layout.feature_names (encoded here), or
        encoded_features: what `feature_codec.encode_features` made of them ({name: float16} or {name: uint8
        codes, name_scale, name_offset}). Deterministic: the same inputs give byte-identical files. Safe to
        call from several threads at once for different shards. (The build streams instead: `stored_arrays`
        and `encode_chunks` per batch as views arrive, `write_shard_chunks` once a shard is complete.)
        """
        start, stop = self.shard_range(shard)
        data = self.stored_arrays(stop - start, pixels=pixels, labels=labels, class_counts=class_counts,
                                  features=features, encoded_features=encoded_features, first_view=start)
        self.write_shard_chunks(shard, {path: self.encode_chunks(path, values) for path, values in data.items()})

    def stored_arrays(self, n: int, *, pixels, labels, class_counts, features: dict | None = None,
                      encoded_features: dict | None = None, first_view: int = 0) -> dict[str, np.ndarray]:
        """{array path: (n, ...) values} of n views as stored, each checked against the layout (shape, dtype)."""
        if not self.writable:
            raise SSRError(f"{self.url} is opened read-only")
        if (features is None) == (encoded_features is None):
            raise ValueError("pass exactly one of features and encoded_features")
        data = self._checked_inputs(n, pixels, labels, class_counts)
        if encoded_features is None:
            encoded_features = self._encode_features(first_view, first_view + n, features)
        data.update(self._checked_encoded(n, encoded_features))
        return data

    def shard_encoder(self, path: str) -> ShardEncoder | None:
        """The encoder of `path`'s shard files; None: the array's layout is written through zarr."""
        if path not in self._shard_encoders:
            self._shard_encoders[path] = ShardEncoder.from_array(self.array(path))
        return self._shard_encoders[path]

    def encode_chunks(self, path: str, values: np.ndarray) -> list:
        """Each view's chunk of array `path`, compressed (thread-safe; GIL released while compressing)."""
        encoder = self.shard_encoder(path)
        if encoder is None:
            return [np.array(v) for v in values]  # kept as values, written through zarr with the shard
        return [encoder.encode_chunk(v) for v in values]

    def write_shard_chunks(self, shard: int, chunks: dict[str, list]) -> None:
        """Write the shard files of every array from their per-view chunks (`encode_chunks`, in view order),
        then the shard's done flags: cleared first, set last (see the module docstring)."""
        if not self.writable:
            raise SSRError(f"{self.url} is opened read-only")
        start, stop = self.shard_range(shard)
        want = {p for p in self.specs if p in ("pixels", "labels", "class_counts") or p.startswith("features/")}
        if set(chunks) != want or any(len(c) != stop - start for c in chunks.values()):
            raise ValueError(f"shard {shard} needs {stop - start} chunks of each of {sorted(want)}")
        done = self.array(DONE)
        done[start:stop] = False  # while the shard is rewritten it is not done (an all-False flag chunk is deleted)
        self._remove_partials(self.shard_key(DONE, shard))
        for path, items in chunks.items():
            self._write_shard_file(path, shard, items)
        done[start:stop] = True

    def _write_shard_file(self, path: str, shard: int, items: list) -> None:
        """Replace one array's shard file (encoded chunks assembled here, or values written by zarr)."""
        encoder = self.shard_encoder(path)
        if encoder is None:
            self._drop_shard_file(path, shard)  # zarr would otherwise read and merge the old shard file
            start, stop = self.shard_range(shard)
            self.array(path)[start:stop] = np.stack(items)
            return
        key = self.shard_key(path, shard)
        self._remove_partials(key)  # temp files of a writer killed while writing this shard before
        self._put_file(key, encoder.file_parts(items))

    def _put_file(self, key: str, parts: list[bytes]) -> None:
        """Replace one file, never leaving half of it under its name. Local: written part by part (no joined
        copy of a 100 MB shard) under zarr LocalStore's temp name, which `_remove_partials` cleans up after a
        kill, then renamed (with `direct_io`, past the page cache where offered); elsewhere one put of the
        whole object."""
        if self.local_path is None:
            sync(self.group.store.set(key, default_buffer_prototype().buffer.from_bytes(b"".join(parts))))
            return
        path = self.local_path / key
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not (self.direct_io and write_direct(tmp, parts)):
                with open(tmp, "wb") as handle:
                    handle.writelines(parts)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _checked_inputs(self, n: int, pixels, labels, class_counts) -> dict:
        L = self.layout
        h, w = L.crop_hw
        return {
            "pixels": _checked("pixels", pixels, (n, h, w, 3), np.uint8),
            "labels": _checked("labels", labels, (n, h, w), np.uint8),
            "class_counts": _checked_counts(class_counts, (n, L.num_classes)),
        }

    def _encode_features(self, start: int, stop: int, features: dict) -> dict[str, np.ndarray]:
        L = self.layout
        missing = sorted(set(L.feature_names) - set(features))
        extra = sorted(set(features) - set(L.feature_names))
        if missing or extra:
            raise ValueError(f"features must have exactly {list(L.feature_names)}; missing {missing}, extra {extra}")
        out = {}
        for name in L.feature_names:
            x = torch.as_tensor(np.asarray(features[name], dtype=np.float32))
            if tuple(x.shape) != (stop - start, *L.feature_shape(name)):
                raise ValueError(f"features[{name!r}] has shape {tuple(x.shape)}, "
                                 f"expected {(stop - start, *L.feature_shape(name))}")
            encoded = encode_features(name, x, L.feature_dtype, f"views {start}-{stop - 1}")
            out.update({k: v.numpy() for k, v in encoded.items()})
        return out

    def _checked_encoded(self, n: int, encoded: dict) -> dict[str, np.ndarray]:
        """{"features/<name>": array} after checking every stored feature array is there with its spec."""
        want = {path[len("features/"):]: spec for path, spec in self.specs.items() if path.startswith("features/")}
        if set(encoded) != set(want):
            raise ValueError(f"encoded features must be exactly {sorted(want)}, got {sorted(encoded)}")
        out = {}
        for name, spec in want.items():
            value = np.asarray(encoded[name])
            out[f"features/{name}"] = _checked(f"features {name}", value, (n, *spec.shape[1:]), np.dtype(spec.dtype))
        return out

    def shard_key(self, path: str, shard: int) -> str:
        """Store key of the file holding `shard` of array `path` (for `done`, its flag chunk)."""
        arr = self.array(path)
        coords = (shard,) + (0,) * (arr.ndim - 1)
        return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"

    def _drop_shard_file(self, path: str, shard: int) -> None:
        key = self.shard_key(path, shard)
        sync(self.group.store.delete(key))
        self._remove_partials(key)

    def _remove_partials(self, key: str) -> None:
        """Delete LocalStore temp files ("<key>.<uuid>.partial") left by a writer killed mid-write."""
        if self.local_path is not None:
            file = self.local_path / key
            for partial in file.parent.glob(f"{file.name}.*.partial"):
                partial.unlink(missing_ok=True)

    # ------------------------------------------------------------ reading

    def feature_names_for(self, levels=None) -> list[str]:
        """Resolve `levels` (None: all; grid sizes like 64 or names like "l64") to names."""
        if levels is None:
            return list(self.layout.feature_names)
        names = [level_name(parse_level(v)) for v in levels]
        unknown = [v for v in names if v not in self.layout.feature_names]
        if unknown:
            raise SSRError(f"{self.url} has no feature level {', '.join(unknown)} "
                           f"(it has {', '.join(self.layout.feature_names)})")
        return names

    def read_view(self, index: int, levels=None, *, with_pixels: bool = True) -> dict:
        """One view: {"pixels" (H,W,3) uint8, "label" (H,W) uint8, "class_counts" (K,) int32,
        "features": {name: float32 (C,g,g)}}. Reads one chunk per array (plus the shard index).
        A view that is not done reads as fill values; check `done_mask()` first when building."""
        i = int(index)
        if not 0 <= i < self.n_views:
            raise IndexError(f"view {i} out of range [0, {self.n_views})")
        return self._read(lambda arr: arr[i], levels, with_pixels)

    def read_views(self, indices, levels=None, *, with_pixels: bool = True) -> dict:
        """Like `read_view` for a batch: every array gains a leading batch axis, in the order given."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_views):
            raise IndexError(f"view indices must lie in [0, {self.n_views})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        contiguous = uniq.size > 0 and uniq[-1] - uniq[0] + 1 == uniq.size

        def gather(arr):
            if uniq.size == 0:
                return np.zeros((0, *arr.shape[1:]), arr.dtype)
            got = arr[int(uniq[0]):int(uniq[-1]) + 1] if contiguous else arr.oindex[uniq]
            return got[inverse]

        return self._read(gather, levels, with_pixels)

    def _read(self, take, levels, with_pixels: bool) -> dict:
        out = {"label": take(self.array("labels")), "class_counts": take(self.array("class_counts"))}
        if with_pixels:
            out["pixels"] = take(self.array("pixels"))
        feats = {}
        for name in self.feature_names_for(levels):
            stored = take(self.array(f"features/{name}"))
            if self.layout.feature_dtype == "int8":
                feats[name] = dequantize_int8(stored, take(self.array(f"features/{name}_scale")),
                                              take(self.array(f"features/{name}_offset")))
            else:
                feats[name] = stored.astype(np.float32)
        out["features"] = feats
        return out


# ---------------------------------------------------------------- fingerprints


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _show(value) -> str:
    if value is _MISSING:
        return "(nothing)"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return "x".join(str(v) for v in value)
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 20 else text[:16] + "..."


_MISSING = object()


def check_fingerprint(store: FeatureStore, expected: dict, keys=None, *, hint: str | None = None) -> None:
    """Raise SSRError naming every fingerprint entry where the store differs from `expected`.

    Nested dicts compare entry by entry ("encoder.checkpoint_sha256", "plan.seed"). `keys` limits the
    comparison to these (dotted or top-level) keys; by default every key of `expected` is compared.
    """
    have, want = _flatten(store.fingerprint), _flatten(_to_json("fingerprint", expected))
    if keys is None:
        names = sorted(want)
    else:
        names = sorted({k for key in keys for k in (set(have) | set(want)) if k == key or k.startswith(key + ".")})
    differ = [k for k in names if have.get(k, _MISSING) != want.get(k, _MISSING)]
    if not differ:
        return
    built = ", ".join(f"{k} {_show(have.get(k, _MISSING))}" for k in differ)
    run = ", ".join(f"{k} {_show(want.get(k, _MISSING))}" for k in differ)
    tail = f"; {hint}" if hint else ""
    raise SSRError(f"store {store.url} was built with {built}, but this run uses {run}{tail}")


# ---------------------------------------------------------------- validation helpers


def _compressors_for(path: str, spec: ArraySpec, layout: StoreLayout) -> tuple:
    if path == DONE:
        return flag_compressors()
    if path.startswith("features/") and not path.endswith(("_scale", "_offset")):
        return feature_compressors(layout.feature_dtype)
    return lossless_compressors(spec.dtype)


def _checked(name: str, value, shape: tuple[int, ...], dtype) -> np.ndarray:
    value = np.asarray(value)
    if value.shape != shape or value.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype)} {shape}, got {value.dtype} {value.shape}")
    return value


def _checked_counts(value, shape: tuple[int, ...]) -> np.ndarray:
    value = np.asarray(value)
    if value.shape != shape or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"class_counts must be integer {shape}, got {value.dtype} {value.shape}")
    if value.size and (value.min() < 0 or value.max() > np.iinfo(np.int32).max):
        raise ValueError("class_counts must lie in [0, 2**31)")
    return value.astype(np.int32)


def _check_view_arrays(view_arrays: dict, n_views: int, n_samples: int):
    """Cast the view table to its stored dtypes; extra columns are kept with their own dtype."""
    missing = sorted(set(VIEW_COLUMNS) - set(view_arrays))
    if missing:
        raise ValueError(f"view_arrays lacks {missing}")
    columns, kinds = {}, {}
    for col, value in view_arrays.items():
        value = np.asarray(value)
        dtype, tail = VIEW_COLUMNS.get(col, (value.dtype.name, value.shape[1:]))
        if value.shape != (n_views, *tail):
            raise ValueError(f"view_arrays[{col!r}] has shape {value.shape}, expected {(n_views, *tail)}")
        cast = value.astype(dtype)
        if value.dtype.kind in "biu" and not np.array_equal(cast, value):
            raise ValueError(f"view_arrays[{col!r}] does not fit {dtype}")
        columns[col], kinds[col] = cast, (dtype, tuple(tail))
    sample_index = columns["sample_index"]
    if sample_index.min() < 0 or sample_index.max() >= n_samples:
        raise ValueError(f"sample_index must lie in [0, {n_samples}) (one sample id per image)")
    return columns, kinds
