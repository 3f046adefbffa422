"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``).

The package ships the original gzip IDX files under :data:`DATA_DIR`: 60,000
training and 10,000 test images of 28x28 greyscale clothes, 10 classes.  The
data is built the same way on every machine:

1. read the four files, checking each IDX header (magic number, dimensions,
   file length) so that a truncated or swapped file fails with its path in the
   message instead of training on garbage;
2. carve a fixed validation set of :data:`VAL_SIZE` images out of the 60,000
   training images (a permutation seeded with :data:`SPLIT_SEED`, not with
   the experiment's seed: every seed of every method sees the same split, and
   the test set is never used to pick anything);
3. scale pixels to [0, 1], then normalise with the mean and standard deviation
   of the remaining training images (one scalar each: greyscale).

``Fashion.fingerprint`` (sha256 over every split's pixels and labels) is
recorded with the results, so two runs can show they used the same data.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
VAL_SIZE = 5_000
SPLIT_SEED = 0
IMAGE_SIZE = 28
#: IDX magic numbers: two zero bytes, the type code (0x08: unsigned byte) and the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (or `make fashion-mnist`)"


class IDXError(ValueError):
    """A file that is not the IDX file it should be (wrong magic, shape or length)."""


def read_idx(path: Path, magic: int) -> Tensor:
    """The uint8 array of a gzip IDX file, after checking that its header is ``magic`` and its length fits.

    Only unsigned-byte IDX files exist in (Fashion-)MNIST, so any other type
    code means a wrong or corrupt file, reported with its path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file not found: {path}; {INSTALL_HINT}")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise IDXError(f"{path}: not a readable gzip file ({error})") from error
    if len(raw) < 4:
        raise IDXError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise IDXError(f"{path}: IDX magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path}: {len(raw)} bytes, too short for a {ndim}-dimensional IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(raw) != header + count:
        raise IDXError(f"{path}: header says shape {tuple(shape)} ({count} bytes), file holds {len(raw) - header}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def write_idx(path: Path, array: Tensor) -> Path:
    """Write a uint8 array as a gzip IDX file: the format :func:`read_idx` reads (the tests' synthetic data)."""
    array = array.to(torch.uint8).contiguous()
    header = struct.pack(">I", 0x00000800 | array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    Path(path).write_bytes(gzip.compress(header + array.numpy().tobytes(), mtime=0))
    return Path(path)


def synthetic_fashion(directory: Path, n_train: int = 200, n_test: int = 50) -> Path:
    """Four IDX files shaped like Fashion-MNIST's, for tests without the package: class-dependent brightness
    plus noise, so a model can learn something and every image differs from every other."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = torch.arange(n) % len(CLASSES)
        noise = torch.randint(0, 20, (n, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
        write_idx(directory / FILES[split][0], (labels[:, None, None] * 25 + noise).clamp(0, 255))
        write_idx(directory / FILES[split][1], labels)
    return directory


def read_split(directory: Path, split: str) -> tuple[Tensor, Tensor]:
    """One split's images (N, 28, 28) and labels (N,), checked against each other."""
    images_name, labels_name = FILES[split]
    images = read_idx(directory / images_name, IMAGES_MAGIC)
    labels = read_idx(directory / labels_name, LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise IDXError(f"{directory / images_name}: images of {tuple(images.shape[1:])}, expected 28x28")
    if len(images) != len(labels):
        raise IDXError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise IDXError(f"{directory / labels_name}: label {int(labels.max())}, expected 0-{len(CLASSES) - 1}")
    return images, labels.long()


@dataclass
class Fashion:
    """Normalised images (N, 1, 28, 28) and labels of the three splits, and the normalisation used."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float
    std: float

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def load_fashion(directory: Path = DATA_DIR, val_size: int = VAL_SIZE, split_seed: int = SPLIT_SEED) -> Fashion:
    """The three splits of :mod:`experiments.fashion` (module docstring), from ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory not found: {directory}; {INSTALL_HINT}")
    train_images, train_labels = read_split(directory, "train")
    test_images, test_labels = read_split(directory, "test")
    if not 0 < val_size < len(train_labels):
        raise ValueError(f"val_size {val_size}: need 0 < val_size < {len(train_labels)} training images")
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(split_seed))
    val, train = order[:val_size].sort().values, order[val_size:].sort().values
    x_train = train_images[train].float().div_(255)
    mean, std = float(x_train.mean()), float(x_train.std())

    def normalise(images: Tensor) -> Tensor:
        return images.float().div(255).sub_(mean).div_(std).unsqueeze(1).contiguous()

    return Fashion(
        x_train=x_train.sub_(mean).div_(std).unsqueeze(1).contiguous(),
        y_train=train_labels[train],
        x_val=normalise(train_images[val]),
        y_val=train_labels[val],
        x_test=normalise(test_images),
        y_test=test_labels,
        mean=mean,
        std=std,
    )
