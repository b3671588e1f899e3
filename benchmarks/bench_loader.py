"""The folder loader's decode throughput per worker: crops cut while decoding against today's
centre square and against torchvision's ImageFolder + RandomResizedCrop, side by side in one run.

Images: ImageNet-sized JPEGs (500x375, quality 90; also 1000x750, where JPEG draft decoding can
help) cut from the photos that ship with the installed packages (scikit-learn's china.jpg and
flower.jpg, matplotlib's grace_hopper.jpg): each file is a random window of one photo (enlarged
first when the photo is smaller), randomly flipped, so no two files are the same. They are written
once to a temporary ImageNet-layout folder per size.

Paths, each one loader worker (one process, one thread) turning files into a uint8 batch:

- ``crop-at-decode``: the default for ``--dataset folder`` (issue 16): Rotation's slim inception
  crop sampled from the file's header, the JPEG decoded by libjpeg-turbo (simplejpeg) at the DCT
  scale the crop needs, cut and resized to 224 (``--crop-resize crop-then-resize``;
  ``BatchLoader(..., plan=DecodePlan("inception", 224))``);
- ``crop-at-decode, pillow-box``: the same boxes decoded by Pillow and resized by Pillow's
  ``resize(box=...)`` (``--crop-resize pillow-box``: the previous code, which runs recorded before
  the option keep);
- ``crop-at-decode, 8 copies``: Exemplar's plan, 8 crops per file (reported per crop and per file);
- ``squash-292``: the patch tasks' plan, the whole file resized to 292x292;
- ``centre-square``: today's path (``--crop-source center-square``), shorter side to 256 and the
  central 256x256 (the task crops on the device afterwards);
- ``torchvision``: ``ImageFolder`` + ``RandomResizedCrop(224)`` + ``PILToTensor`` through a
  ``DataLoader`` with ``num_workers=0`` (its loader decodes the whole file and converts it to RGB);
  ``torchvision, 8 copies``: the same with a transform that cuts 8 such crops of the one decoded file.

Rounds alternate the paths (A B C ... A B C ...), so a machine shared with other jobs slows them
alike; each path's figure is the median of its rounds. Ratios are against the centre square and
against torchvision.

A breakdown follows (``breakdown_ms_per_file``): the single-crop paths' stages timed apart on the
same files and boxes, in the same alternating rounds (decode with Pillow at the draft scale, with
simplejpeg at the same scale, with Pillow at full size and RGB conversion as torchvision's loader
does; the resize as ``crop-then-resize``, as Pillow's box resize, and as ``RandomResizedCrop``).

    .venv/bin/python benchmarks/bench_loader.py                  # about a minute on one core
    .venv/bin/python benchmarks/bench_loader.py --images 32 --rounds 3   # a quick look
    .venv/bin/python benchmarks/bench_loader.py --rounds 7 --runs 3      # benchmarks/README.md's table
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL
import torch
from PIL import Image

from pretextlab import atomic
from pretextlab.data import BatchLoader, DecodePlan
from pretextlab.data.crops import crop_rng, sample_crop_box
from pretextlab.data.decode import decode_boxes, resolve_decoder
from pretextlab.data.folder import FolderImageSet, scan_split

HERE = Path(__file__).resolve().parent
SIZE = (500, 375)  # width, height: a typical ImageNet photo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="JPEG files written (and decoded per round)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path (median reported)")
    parser.add_argument("--runs", type=int, default=1,
                        help="whole measurements, each on new files (the table: each figure's median over the runs)")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--sizes", nargs="+", default=["500x375", "1000x750"], help="file sizes WIDTHxHEIGHT")
    parser.add_argument("--out", default=str(HERE / "results" / "loader.json"))
    return parser.parse_args()


def bundled_photos() -> list[tuple[str, Image.Image]]:
    """The photos that ship with scikit-learn and matplotlib (whichever are installed)."""
    found = []
    try:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
        found += [(f"scikit-learn {p.name}", p) for p in sorted(folder.glob("*.jpg"))]
    except ImportError:
        pass
    try:
        import matplotlib

        found += [("matplotlib grace_hopper.jpg", Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")]
    except ImportError:
        pass
    photos = [(name, Image.open(path).convert("RGB")) for name, path in found if path.exists()]
    if not photos:
        raise SystemExit("bench_loader: no bundled photo found (needs scikit-learn or matplotlib installed)")
    return photos


def write_jpegs(root: Path, count: int, quality: int, size: tuple[int, int] = SIZE) -> list[str]:
    """``count`` JPEGs of ``size`` (width, height) in ``root/train/<photo>/``; returns the photos' names."""
    rng = np.random.default_rng(0)
    photos = bundled_photos()
    width, height = size
    for i in range(count):
        name, photo = photos[i % len(photos)]
        scale = max(width / photo.width, height / photo.height, 1.0) * rng.uniform(1.0, 1.3)
        big = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
        left, top = int(rng.integers(0, big.width - width + 1)), int(rng.integers(0, big.height - height + 1))
        window = big.crop((left, top, left + width, top + height))
        if rng.random() < 0.5:
            window = window.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / "train" / f"class{i % len(photos)}"
        folder.mkdir(parents=True, exist_ok=True)
        window.save(folder / f"{i:04d}.jpg", quality=quality)
    return [name for name, _ in photos]


def time_pass(run: Callable[[], int]) -> tuple[float, float, int]:
    """(CPU seconds of this process, wall seconds, items produced) of one pass. The figures are per
    CPU second: on a machine shared with other jobs the wall clock also counts their time slices,
    while one worker's CPU time is what it costs a core (one thread; the loader runs in-process)."""
    cpu, wall = time.process_time(), time.perf_counter()
    produced = run()
    return time.process_time() - cpu, time.perf_counter() - wall, produced


def measure(size: tuple[int, int], args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Every path's throughput on ``args.images`` files of ``size``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = write_jpegs(root, args.images, args.quality, size)
        scan = scan_split(root, "train", progress=False)
        batch = args.images

        def ours(side: int, plan: DecodePlan | None) -> Callable[[], int]:
            images = FolderImageSet.from_scan(scan, side)
            epoch = iter(range(10**6))

            def run() -> int:
                # A new epoch each pass: new crops, as in training.
                loader = BatchLoader(images, batch, shuffle=True, seed=0, epoch=next(epoch), drop_last=True, plan=plan)
                return sum(b.images.shape[0] for b in loader)

            return run

        def torchvision_path(copies: int) -> Callable[[], int]:
            from torch.utils.data import DataLoader
            from torchvision import datasets, transforms

            crop = transforms.Compose([transforms.RandomResizedCrop(224), transforms.PILToTensor()])
            transform = crop if copies == 1 else (lambda image: torch.stack([crop(image) for _ in range(copies)]))
            loader = DataLoader(datasets.ImageFolder(str(root / "train"), transform=transform), batch_size=batch, shuffle=True)
            return lambda: sum(images.shape[0] * (images.shape[1] if images.ndim == 5 else 1) for images, _ in loader)

        paths: dict[str, tuple[Callable[[], int], int]] = {
            "crop-at-decode": (ours(224, DecodePlan("inception", 224)), 1),
            "crop-at-decode, pillow-box": (ours(224, DecodePlan("inception", 224, resize="pillow-box")), 1),
            "centre-square": (ours(256, None), 1),
            "torchvision": (torchvision_path(1), 1),
            "squash-292": (ours(292, DecodePlan("squash", 292)), 1),
            "crop-at-decode, 8 copies": (ours(224, DecodePlan("inception", 224, copies=8)), 8),
            "torchvision, 8 copies": (torchvision_path(8), 8),
        }
        stages = breakdown_stages(root, size)
        for run, _ in paths.values():  # warm-up: imports, first-file caches
            run()
        rates: dict[str, list[float]] = {name: [] for name in paths}
        wall_rates: dict[str, list[float]] = {name: [] for name in paths}
        stage_ms: dict[str, list[float]] = {name: [] for name in stages}
        for _ in range(args.rounds):
            for name, (run, _) in paths.items():
                seconds, wall, produced = time_pass(run)
                rates[name].append(produced / seconds)
                wall_rates[name].append(produced / wall)
            for name, (run, files) in stages.items():
                seconds, _, _ = time_pass(run)
                stage_ms[name].append(1e3 * seconds / files)
    results: dict[str, Any] = {}
    for name, (_, copies) in paths.items():
        per_view = statistics.median(rates[name])
        results[name] = {
            "views_per_second_per_worker": round(per_view, 1),
            "files_per_second_per_worker": round(per_view / copies, 1),
            "views_per_file": copies,
            "rounds_views_per_second": [round(r, 1) for r in rates[name]],
            "rounds_views_per_wall_second": [round(r, 1) for r in wall_rates[name]],
        }
    today = results["centre-square"]["files_per_second_per_worker"]
    for name, entry in results.items():
        entry["files_ratio_to_centre_square"] = round(entry["files_per_second_per_worker"] / today, 2)
        reference = results["torchvision, 8 copies" if entry["views_per_file"] == 8 else "torchvision"]
        entry["files_ratio_to_torchvision"] = round(entry["files_per_second_per_worker"] / reference["files_per_second_per_worker"], 2)
    results["breakdown_ms_per_file"] = {name: round(statistics.median(ms), 3) for name, ms in stage_ms.items()}
    return results, photos


def breakdown_stages(root: Path, size: tuple[int, int]) -> dict[str, tuple[Callable[[], int], int]]:
    """Each stage of the single-crop paths on its own, over the written files, one slim box per
    file: (run, files per run). Decodes and resizes are timed apart: a resize stage works on
    pictures decoded beforehand."""
    from torchvision.transforms import RandomResizedCrop, functional

    files = sorted((root / "train").rglob("*.jpg"))
    data = [f.read_bytes() for f in files]
    width, height = size
    boxes = [sample_crop_box(crop_rng(0, 0, 0, 0, i), height, width) for i in range(len(files))]
    whole = [Image.open(f).convert("RGB") for f in files]
    arrays = [np.array(image) for image in whole]
    rrc = RandomResizedCrop(224)

    def each(work: Callable[[int], object]) -> tuple[Callable[[], int], int]:
        return (lambda: sum(1 for i in range(len(files)) if work(i) is not None)), len(files)

    def drafted(i: int) -> Image.Image:
        b = boxes[i]
        image = Image.open(files[i])
        image.draft("RGB", (-(-width * 224 // b.width), -(-height * 224 // b.height)))
        image.load()
        return image

    stages = {
        "decode: Pillow, draft scale": each(drafted),
        "decode: Pillow, full size + convert RGB (torchvision's loader)": each(lambda i: Image.open(files[i]).convert("RGB").load()),
        "resize: Pillow resize(box=...) of the whole picture": each(lambda i: whole[i].resize(
            (224, 224), Image.Resampling.BILINEAR, box=(boxes[i].left, boxes[i].top, boxes[i].left + boxes[i].width, boxes[i].top + boxes[i].height))),
        "resize: crop-then-resize (torch uint8 antialiased bilinear)": each(lambda i: torch.nn.functional.interpolate(
            torch.from_numpy(arrays[i])[boxes[i].top:boxes[i].top + boxes[i].height, boxes[i].left:boxes[i].left + boxes[i].width]
            .permute(2, 0, 1).unsqueeze(0), size=(224, 224), mode="bilinear", antialias=True)),
        "resize: torchvision RandomResizedCrop + PILToTensor": each(lambda i: functional.pil_to_tensor(rrc(whole[i]))),
        "whole crop-at-decode decode_box (no loader)": each(lambda i: decode_boxes(files[i], lambda h, w: [boxes[i]], 224)),
    }
    if resolve_decoder("auto") == "simplejpeg":
        import simplejpeg

        def simple(i: int) -> np.ndarray:
            b = boxes[i]
            need = (-(-width * 224 // b.width), -(-height * 224 // b.height))
            s = next((s for s in (8, 4, 2, 1) if min(width // need[0], height // need[1]) >= s), 1)
            return simplejpeg.decode_jpeg(data[i], "rgb", min_height=-(-height // s), min_width=-(-width // s), min_factor=s)

        stages["decode: simplejpeg, draft scale"] = each(simple)
    return stages


def _simplejpeg_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("simplejpeg")
    except Exception:  # not installed: the loader falls back to Pillow
        return None


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each path's figures (and each breakdown stage) as the median over ``runs`` of one size;
    the per-round lists are the first run's."""
    if len(runs) == 1:
        return runs[0]
    merged: dict[str, Any] = {}
    for name, first in runs[0].items():
        merged[name] = {
            key: (round(statistics.median(run[name][key] for run in runs), 3 if name.startswith("breakdown") else 2)
                  if isinstance(value, float) and key != "views_per_file" else value)
            for key, value in first.items()
        }
        if not name.startswith("breakdown"):
            merged[name]["runs_files_per_second"] = [run[name]["files_per_second_per_worker"] for run in runs]
            merged[name]["runs_files_ratio_to_centre_square"] = [run[name]["files_ratio_to_centre_square"] for run in runs]
            merged[name]["runs_files_ratio_to_torchvision"] = [run[name]["files_ratio_to_torchvision"] for run in runs]
    return merged


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # one worker, one core: the figure is per worker
    by_size, photos = {}, []
    for _ in range(args.runs):
        for text in args.sizes:
            width, height = (int(v) for v in text.lower().split("x"))
            result, photos = measure((width, height), args)
            by_size.setdefault(f"{width}x{height}", []).append(result)
    by_size = {size: median_of_runs(runs) for size, runs in by_size.items()}
    record = {
        "benchmark": "loader",
        "images": {"count_per_size": args.images, "jpeg_quality": args.quality, "made_from": photos},
        "rounds": args.rounds,
        "runs": args.runs,
        "threads": 1,
        "timing": "CPU seconds of the benchmark process (time.process_time), medians of the rounds; wall-clock rounds "
                  "alongside; with runs > 1 each figure is the median of the runs' figures (runs_* lists each run's)",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "pillow": PIL.__version__, "simplejpeg": _simplejpeg_version()},
        "ratios": "files/s against centre-square and against torchvision (8-copy paths against torchvision, 8 copies)",
        "sizes": by_size,
    }
    atomic.write_json(args.out, record)
    for size, results in by_size.items():
        breakdown = results["breakdown_ms_per_file"]
        results = {name: entry for name, entry in results.items() if name != "breakdown_ms_per_file"}
        width = max(len(n) for n in results)
        print(f"\n{size}: {'path':<{width}}  files/s  views/s  vs centre-square  vs torchvision")
        for name, entry in results.items():
            print(f"{' ' * len(size)}  {name:<{width}}  {entry['files_per_second_per_worker']:7.1f}  "
                  f"{entry['views_per_second_per_worker']:7.1f}  {entry['files_ratio_to_centre_square']:15.2f}x"
                  f"  {entry['files_ratio_to_torchvision']:12.2f}x")
        for name, ms in breakdown.items():
            print(f"{' ' * len(size)}  {ms:6.3f} ms/file  {name}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
