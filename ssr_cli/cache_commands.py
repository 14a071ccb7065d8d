"""`ssr cache …`: build, inspect and verify SAM feature caches."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.data.datasets import DATASETS
from ssr_cache.data.datasets.base import SHORT_SIDE_ONLY
from ssr_cache.errors import SSRError
from ssr_cache.store.inspect import store_info, verify_store
from ssr_cli.parsing import config_defaults, parse_int_list, parse_resize, parse_size

cache_app = typer.Typer(help="SAM feature caches: build, info, verify.", no_args_is_help=True)
console = Console()
# The build's defaults live in CacheBuildConfig alone; its flags show them (crop as WxH, ranges as lo,hi).
BUILD = config_defaults(CacheBuildConfig)


def _parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise SSRError(f"--ratio-range must look like 0.5,2.0, got {text!r}") from None
    return lo, hi


@cache_app.command("build")
def build(
    dataset: str = typer.Option(..., help=f"One of: {', '.join(DATASETS)}."),
    data_root: Path = typer.Option(..., "--data-root", help="Dataset root in the real layout."),
    out: str = typer.Option(..., help="Store path or fsspec URL (s3://…, memory://…)."),
    split: str = typer.Option(BUILD["split"], help="Dataset split."),
    labelled: bool = typer.Option(None, "--labelled/--unlabelled", show_default=False,
                                  help="Build a labelled source (labels stored, cat_max_ratio, RCS counts) or an "
                                       "unlabelled target. Default: gta5/synthia labelled, cityscapes/acdc/"
                                       "dark_zurich train unlabelled, a folder labelled when it has labels/."),
    conditions: str = typer.Option(None, help="ACDC fog,night,rain,snow (default all); Dark Zurich "
                                              "day,twilight,night (default night)."),
    sam: str = typer.Option(BUILD["sam"], help="SAM encoder: vit_b, vit_l, vit_h, or vit_tiny (tests/demo)."),
    sam_checkpoint: Path = typer.Option(None, "--sam-checkpoint", help="Official SAM .pth; none = random init."),
    sam_seed: int = typer.Option(BUILD["sam_seed"], help="Seed of a random-init encoder."),
    views_per_image: int = typer.Option(BUILD["views_per_image"], help="Augmented views (crops) per image."),
    crop: str = typer.Option("{1}x{0}".format(*BUILD["crop"]), help="Crop size WxH, or one number (square)."),
    resize: str = typer.Option(None, help="Keep-ratio resize bound WxH, or one number = the short side (default: "
                                          "DAFormer's per dataset: GTA5 1280x720, SYNTHIA 1280x760, Cityscapes "
                                          "1024x512, ACDC/Dark Zurich 960x540; folder: short side 512)."),
    ratio_range: str = typer.Option("{},{}".format(*BUILD["ratio_range"]), help="Random rescale ratio range lo,hi."),
    seed: int = typer.Option(BUILD["seed"], help="Seed of the view plan."),
    levels: str = typer.Option(None, help="Stored grid sizes, e.g. 64,32,16 (default: neck, /2, /4)."),
    feature_dtype: str = typer.Option(BUILD["feature_dtype"], help="float16 (lossless wrt fp16) or int8 (per-channel affine)."),
    views_per_shard: int = typer.Option(BUILD["views_per_shard"], help="Views per Zarr shard file."),
    batch_size: int = typer.Option(BUILD["batch_size"], help="Views per encoder batch."),
    device: str = typer.Option(BUILD["device"], help="auto (CUDA when present), cpu, cuda, cuda:1 …"),
    autocast: str = typer.Option(None, help="SAM precision: bf16, fp16 or fp32 (default bf16 on CUDA, fp32 on "
                                            "CPU; the reference runs SAM in fp32). Recorded in the cache."),
    workers: int = typer.Option(BUILD["workers"], show_default=False,
                                help="Decoding worker processes (0: decode in the main process). Default: 2 on a "
                                     "CPU; on a GPU half this rank's share of the cores, 2-8."),
    writer_threads: int = typer.Option(None, help="Threads compressing and writing shards (default: this rank's "
                                       "share of the cores, 2-8)."),
    direct_io: bool = typer.Option(BUILD["direct_io"], "--direct-io/--buffered-io",
                                   help="Write shard files past the page cache (O_DIRECT, where the filesystem "
                                        "offers it), or through it (keeps a small cache in memory for a training "
                                        "run right after)."),
    max_images: int = typer.Option(None, help="Only the first N images (reduced builds)."),
    overwrite: bool = typer.Option(BUILD["overwrite"], "--overwrite",
                                   help="Replace a store built with other settings."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and projected size; run nothing."),
) -> None:
    """Run frozen SAM once over planned views and store multi-scale embeddings."""
    w, h = parse_size(crop, what="--crop")
    cfg = CacheBuildConfig(
        dataset=dataset, data_root=data_root, out=out, split=split, labelled=labelled,
        conditions=tuple(c.strip() for c in conditions.split(",") if c.strip()) if conditions else None,
        sam=sam, sam_checkpoint=sam_checkpoint, sam_seed=sam_seed, views_per_image=views_per_image, crop=(h, w),
        resize=parse_resize(resize) if resize else None, ratio_range=_parse_range(ratio_range),
        seed=seed, levels=parse_int_list(levels, what="--levels") if levels else None,
        feature_dtype=feature_dtype, views_per_shard=views_per_shard, batch_size=batch_size, device=device,
        autocast=autocast, workers=workers, writer_threads=writer_threads, direct_io=direct_io,
        max_images=max_images, overwrite=overwrite,
    )
    _describe_or_build(cfg, dry_run=dry_run)


def _describe_or_build(cfg: CacheBuildConfig, *, dry_run: bool) -> None:
    # Lazy: the size estimate and the build import the SAM encoder (segment_anything), which only the
    # commands that run SAM load; `ssr train` in cache mode never does (tests/test_train_engine.py).
    if dry_run:
        from ssr_cache.build.size_estimate import describe_plan

        _print_plan(describe_plan(cfg))
        return
    from ssr_cache.build.pipeline import build_cache  # lazy, as the size estimate above

    result = build_cache(cfg, console=console)
    rate = f", {result.views_per_second:.1f} views/s after start-up" if result.built_views else ""
    console.print(f"built {result.built_views} views, reused {result.reused_views}, "
                  f"{result.n_views} in {result.url} ({result.seconds:.1f} s{rate})")
    if result.random_init:
        console.print("[yellow]note: random-init encoder — features are not SAM features[/]")


def _print_plan(plan: dict) -> None:
    table = Table(title=f"cache plan: {plan['n_images']} images × {plan['views_per_image']} views "
                        f"= {plan['n_views']} views", show_lines=False)
    table.add_column("array")
    table.add_column("per view", justify="right")
    table.add_column("uncompressed total", justify="right")
    table.add_column("projected on disk", justify="right")
    for row in plan["arrays"]:
        table.add_row(row["name"], _b(row["bytes_per_view"]), _b(row["bytes_per_view"] * plan["n_views"]),
                      _b(row["projected_bytes"]))
    table.add_row("[bold]total", "", _b(plan["uncompressed_bytes"]), f"[bold]{_b(plan['projected_bytes'])}")
    console.print(table)
    console.print(f"encoder {plan['encoder']} at {plan['input_size']}², levels {plan['levels']}, "
                  f"{plan['feature_dtype']}, {plan['n_shards']} shards of {plan['views_per_shard']} views")


def _b(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


@cache_app.command("info")
def info(
    path: str = typer.Argument(..., help="Store path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the store's facts as one JSON object."),
) -> None:
    """Dataset, labelled, label space, views, encoder, size on disk and compression ratio per array."""
    data = store_info(path)
    if as_json:
        print(json.dumps(data))
        return
    enc = data["encoder"]
    space = data["label_space"]
    role = "labelled source" if data["labelled"] else "unlabelled target"
    console.print(f"[bold]{path}[/]: {data['n_views']} views ({data['done_views']} done) of "
                  f"{data['n_images']} images, {data['dataset']}/{data['split']} ({role}), encoder {enc['name']} "
                  f"{'[yellow](random init)[/]' if enc['random_init'] else ''}, SAM precision {data['precision']}")
    resize = data["resize"] or (0, 0)
    resize = f"short side {resize[1]}" if resize[0] == SHORT_SIDE_ONLY else f"{resize[0]}x{resize[1]}"
    console.print(f"label space {space['name']}: {len(space['class_names'])} classes; crop "
                  f"{data['crop'][1]}x{data['crop'][0]}, resize {resize}")
    table = Table()
    for col in ("array", "shape", "dtype", "chunks", "shards", "stored", "raw", "ratio"):
        table.add_column(col, justify="left" if col in ("array", "dtype") else "right")
    for a in data["arrays"]:
        table.add_row(a["name"], "×".join(map(str, a["shape"])), a["dtype"], "×".join(map(str, a["chunks"])),
                      "×".join(map(str, a["shards"])) if a.get("shards") else "-", _b(a["stored_bytes"]),
                      _b(a["raw_bytes"]), f"{a['ratio']:.2f}")
    console.print(table)
    console.print(f"total on disk: {_b(data['total_stored_bytes'])}")


@cache_app.command("verify")
def verify(
    path: str = typer.Argument(..., help="Store path or URL."),
    deep: bool = typer.Option(False, "--deep", help="Re-encode a sample of views with SAM and compare."),
    deep_views: int = typer.Option(4, help="How many views --deep re-encodes."),
    data_root: Path = typer.Option(None, "--data-root", help="Dataset root for --deep (default: as built)."),
    sam_checkpoint: Path = typer.Option(None, "--sam-checkpoint", help="Checkpoint for --deep (default: as built)."),
    device: str = typer.Option("auto", help="Where --deep runs SAM: auto (CUDA when present), cpu, cuda:N."),
) -> None:
    """Every view done, every chunk readable, shapes/dtypes, no NaN/Inf (and --deep re-encoding)."""
    deep_check = None
    if deep:
        # Lazy: re-encoding loads the SAM encoder, which no other command needs (see `build`).
        from ssr_cache.store.deep_verify import deep_runtime_line, make_deep_check

        console.print(deep_runtime_line(path, device))
        deep_check = make_deep_check(n_views=deep_views, data_root=data_root, sam_checkpoint=sam_checkpoint,
                                     device=device)
    report = verify_store(path, progress=True, deep_check=deep_check)
    for problem in report.problems[:50]:
        console.print(f"[red]✗[/] {problem}")
    if report.problems:
        raise SSRError(f"{path}: {len(report.problems)} problem(s) found")
    console.print(f"[green]✓[/] {path}: {report.n_views} views verified" + (" (deep)" if deep else ""))
