"""Fashion-MNIST from its four idx files (.gz or not), held in memory as uint8 tensors.

Where the files are looked for: an explicit ``data_dir`` (--data-dir) only, and it must exist (a
mistyped path must not quietly read another copy); without one, in order, ``$PRETEXTLAB_DATA``,
Debian's ``/usr/share/datasets/fashion-mnist`` (package dataset-fashion-mnist), ``~/.cache/pretextlab``.
In each, the folder itself, its ``fashion-mnist/`` and torchvision's ``FashionMNIST/raw/``. If none
has them and ``download`` is allowed, torchvision downloads them into ``data_dir`` (or the cache).
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretextlab.data.imageset import TensorImageSet
from pretextlab.errors import PretextlabError

ENV_VAR = "PRETEXTLAB_DATA"
SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
CACHE_DIR = Path("~/.cache/pretextlab")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_SUBFOLDERS = (".", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw")
_RESIZE_CHUNK = 4096  # images resized at once: bounds the float32 working memory


@dataclass(frozen=True)
class FashionMnistArrays:
    """The raw 28x28 images and labels of both official splits."""

    train_images: np.ndarray  # uint8 (60000, 28, 28)
    train_labels: np.ndarray  # int64 (60000,)
    test_images: np.ndarray  # uint8 (10000, 28, 28)
    test_labels: np.ndarray  # int64 (10000,)
    source: Path  # the folder the files were read from


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete_folder(base: Path) -> Path | None:
    for sub in _SUBFOLDERS:
        folder = base if sub == "." else base / sub
        if all(_file_in(folder, stem) is not None for stem in FILES.values()):
            return folder
    return None


def candidate_dirs(
    data_dir: str | os.PathLike | None,
    environment: dict[str, str] | None = None,
    system_dirs: Sequence[Path] = SYSTEM_DIRS,
    cache_dir: Path = CACHE_DIR,
) -> list[Path]:
    """Where to look, in order (see the module docstring); ``environment`` defaults to os.environ."""
    if data_dir:
        return [Path(data_dir).expanduser()]
    environment = dict(os.environ) if environment is None else environment
    bases = []
    if environment.get(ENV_VAR):
        bases.append(Path(environment[ENV_VAR]).expanduser())
    bases.extend(Path(d) for d in system_dirs)
    bases.append(Path(cache_dir).expanduser())
    return bases


def find_fashion_mnist(bases: Sequence[Path]) -> Path | None:
    """The first of ``bases`` (or a known subfolder of one) that holds all four files."""
    for base in bases:
        if base.is_dir():
            found = _complete_folder(base)
            if found is not None:
                return found
    return None


def _file_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped where it is .gz. A process that loads Fashion-MNIST again (every
    evaluation of a study's cells, every Trainer in the test suite) reuses the last folder's
    decompressed files instead of gunzipping 55 MB again (~0.3 CPU-s); a file changed or replaced
    since (size, mtime or inode) is read afresh."""
    stat = path.stat()
    return _decompressed(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=len(FILES))
def _decompressed(path: str, size: int, mtime_ns: int, inode: int) -> bytes:
    del size, mtime_ns, inode  # part of the cache key only
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return handle.read()


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        data = bytearray(_file_bytes(path))  # writable, so torch can wrap the arrays without a copy
    except (OSError, EOFError) as error:
        raise PretextlabError(f"cannot read {path} ({error}): the file is damaged; delete it and get it again") from error
    # idx header: two zero bytes, a type byte (0x08 = uint8), the number of dims, then big-endian sizes.
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expected_dims:
        raise PretextlabError(f"{path} is not an idx file of uint8 with {expected_dims} dimensions: it is damaged or not Fashion-MNIST")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_dims))
    offset = 4 + 4 * expected_dims
    if len(data) - offset != int(np.prod(shape)):
        raise PretextlabError(f"{path} is truncated: its header says {shape} but it holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def read_fashion_mnist(folder: Path) -> FashionMnistArrays:
    """Read the four idx files from ``folder``."""
    arrays = {key: _read_idx(_file_in(folder, stem), 3 if key.endswith("images") else 1) for key, stem in FILES.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max(initial=0) >= len(CLASS_NAMES):
            raise PretextlabError(f"the {split} files in {folder} do not match (images {images.shape}, labels {labels.shape}): they are not Fashion-MNIST")
    return FashionMnistArrays(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        source=folder,
    )


def _download(target: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
    except Exception as error:  # no network, a proxy, a full disk: all end in the same advice
        raise PretextlabError(
            f"Fashion-MNIST is not on this machine and downloading it into {target} failed ({error}). "
            f"Install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir to a folder "
            f"holding its four idx files, or set ${ENV_VAR}"
        ) from error
    return target / "FashionMNIST" / "raw"


def locate_fashion_mnist(
    data_dir: str | os.PathLike | None,
    download: bool = True,
    environment: dict[str, str] | None = None,
    system_dirs: Sequence[Path] = SYSTEM_DIRS,
    cache_dir: Path = CACHE_DIR,
) -> Path:
    """The folder holding the four files, downloading them if allowed and needed."""
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise PretextlabError(
            f"--data-dir {data_dir} does not exist or is not a folder: fix the path, or leave --data-dir out to use "
            f"${ENV_VAR}, {SYSTEM_DIRS[0]} (apt-get install dataset-fashion-mnist) or a download"
        )
    bases = candidate_dirs(data_dir, environment, system_dirs, cache_dir)
    found = find_fashion_mnist(bases)
    if found is not None:
        return found
    if not download:
        raise PretextlabError(
            f"Fashion-MNIST not found (looked in {', '.join(str(b) for b in bases)}): install it with "
            f"`apt-get install dataset-fashion-mnist`, or pass --data-dir to a folder holding its four idx "
            f"files ({', '.join(FILES.values())}, .gz or not), or allow the download"
        )
    return _download(Path(data_dir).expanduser() if data_dir else Path(cache_dir).expanduser())


def resize_gray(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> uint8 (N, 1, size, size), bilinear (antialiased when shrinking)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if images.shape[-1] == size and images.shape[-2] == size:
        return tensor.clone()
    out = torch.empty((len(images), 1, size, size), dtype=torch.uint8)
    shrinking = size < images.shape[-1]
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = tensor[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def image_set(images: np.ndarray, labels: np.ndarray, size: int) -> TensorImageSet:
    """An in-memory set of the given 28x28 images, resized once to ``size``."""
    return TensorImageSet(resize_gray(images, size), labels, CLASS_NAMES)
