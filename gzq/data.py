"""Labelled image data for real-accuracy evaluation: Fashion-MNIST (IDX files) and ImageFolder trees.

Synthesis never touches these; they exist to *measure* how good the quantized students are.
"""
from __future__ import annotations

import gzip
import logging
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

log = logging.getLogger(__name__)

FASHION_MNIST_ROOT = Path(os.environ.get("GZQ_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_ZIP_BYTES = int(os.environ.get("GZQ_MAX_ZIP_MB", "200")) * 2**20   # uncompressed labelled-data zip
MAX_ZIP_FILES = 20_000


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(shape)


def load_fashion_mnist(split: str = "test", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as tensors.

    Returns:
        images: (N, 28, 28) uint8, labels: (N,) int64.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    prefix = "train" if split == "train" else "t10k"
    img_path, lbl_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lbl_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root} (expected {img_path.name} and {lbl_path.name}); "
            "install it with `apt-get install dataset-fashion-mnist` or set GZQ_FASHION_MNIST to its folder"
        )
    images = torch.from_numpy(_read_idx(img_path).copy())
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    return images, labels


def colourise(images_u8: torch.Tensor, seed: int) -> torch.Tensor:
    """Grey images (N, H, W) -> RGB (N, 3, H, W) uint8, each image tinted by its own per-channel gains in
    [0.35, 1] drawn from `seed`: a deterministic 3-channel variant of a grey data set, whose channels are
    correlated but differ in their statistics, as in natural RGB images."""
    g = torch.Generator().manual_seed(seed)
    gains = torch.rand(len(images_u8), 3, 1, 1, generator=g) * 0.65 + 0.35          # (N, 3, 1, 1)
    return (images_u8.unsqueeze(1).float() * gains).round().clamp(0, 255).to(torch.uint8)


#: labelled data sets a model card can name (`dataset`), each loaded offline: name -> (split -> uint8, labels)
LABELLED_DATASETS = {
    "fashion-mnist": lambda split: load_fashion_mnist(split),
    # tinted RGB Fashion-MNIST; the train and test splits draw their tints from different seeds
    "fashion-mnist-rgb": lambda split: (lambda x, y: (colourise(x, 0 if split == "train" else 1), y))(
        *load_fashion_mnist(split)),
}


def load_dataset(name: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """A named labelled data set (see LABELLED_DATASETS) as uint8 images (N, [C,] H, W) and labels (N,)."""
    if name not in LABELLED_DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(LABELLED_DATASETS)}")
    return LABELLED_DATASETS[name](split)


def to_model_input(images_u8: torch.Tensor, mean, std, input_size) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> normalised float (N, C, H', W') at the model's input size."""
    x = images_u8.float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    c, h, w = input_size
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = (x * channel_view([0.299, 0.587, 0.114])).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    if x.shape[-2:] != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return (x - channel_view(mean, x)) / channel_view(std, x)


def channel_view(values, like: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel values (a mean or std) as a (1, C, 1, 1) tensor, in `like`'s dtype and on its device."""
    if like is None:
        return torch.tensor(values).view(1, -1, 1, 1)
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def load_image_folder(root: str | Path, input_size) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load an ImageFolder tree (root/<class>/<image>) into uint8 tensors at the model's input size.

    Classes are the sorted sub-folder names, as torchvision's ImageFolder orders them, so the i-th
    folder must be the model's class i.

    Returns:
        images: (N, C, H, W) uint8, labels: (N,) int64, class names.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"labelled data folder {root} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{root} is not an image folder: expected one sub-folder per class (root/<class>/<image>.png), found none"
        )
    c, h, w = input_size
    mode = "L" if c == 1 else "RGB"
    images, labels = [], []
    for idx, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert(mode).resize((w, h), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{path} is not a readable image: {e}") from None
            images.append(torch.from_numpy(arr.copy()).reshape(h, w, -1).permute(2, 0, 1))
            labels.append(idx)
    if not images:
        raise ValueError(f"{root} has class folders {classes[:5]} but no images ({', '.join(IMAGE_EXTENSIONS)})")
    log.info("loaded %d images in %d classes from %s", len(images), len(classes), root)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes


# ------------------------------------------------------------------------- labelled data as a zip

def extract_image_folder_zip(zip_path: str | Path, dest: str | Path, max_bytes: int = MAX_ZIP_BYTES,
                             max_files: int = MAX_ZIP_FILES) -> Path:
    """Extract an ImageFolder zip (<class>/<image>, optionally under one top folder) safely; return its root.

    Refuses what is not a zip, absolute or '..' paths, links, more than `max_files` entries or
    `max_bytes` uncompressed (counted while writing, so a lying header cannot get past), and zips
    without class folders holding images. Raises ValueError with a message for the user.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if not zipfile.is_zipfile(zip_path):
        raise ValueError(f"labelled data {zip_path.name!r} is not a zip file; upload a .zip of an image folder "
                         "(one sub-folder per class)")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            if len(infos) > max_files:
                raise ValueError(f"labelled data zip has {len(infos)} entries; at most {max_files} are accepted")
            if sum(i.file_size for i in infos) > max_bytes:
                raise ValueError(f"labelled data zip unpacks to more than {max_bytes // 2**20} MB; "
                                 "upload a smaller sample")
            written = 0
            for info in infos:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
                    raise ValueError(f"labelled data zip has an unsafe path {info.filename!r}; refusing to extract")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ValueError(f"labelled data zip contains a link {info.filename!r}; refusing to extract")
                if not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
                    continue
                target = dest.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ValueError(f"labelled data zip unpacks to more than {max_bytes // 2**20} MB; "
                                             "upload a smaller sample")
                        dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise ValueError(f"labelled data zip is corrupt ({e})") from None
    return find_image_folder_root(dest)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def find_image_folder_root(root: Path) -> Path:
    """The folder whose sub-folders are classes: `root` itself, or the single folder a zip wrapped it in."""
    for _ in range(3):
        subdirs = [d for d in root.iterdir() if d.is_dir()]
        with_images = [d for d in subdirs if any(_is_image(p) for p in d.rglob("*"))]
        loose = [p for p in root.iterdir() if _is_image(p)]
        if len(subdirs) == 1 and not loose and not any(_is_image(p) for p in subdirs[0].iterdir()):
            root = subdirs[0]  # zip of the folder itself: descend
            continue
        if with_images and not loose:
            return root
        break
    raise ValueError("labelled data zip is not an image folder: expected one sub-folder per class with images "
                     f"inside (e.g. cat/001.png, dog/002.jpg; {', '.join(IMAGE_EXTENSIONS)})")
