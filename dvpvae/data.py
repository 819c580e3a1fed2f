"""Datasets of the paper (MNIST, OMNIGLOT 28x28, CIFAR10) and generic ``.npz`` images.

Every loader returns uint8 arrays of shape (N, C, H, W); images stay uint8 in memory
and become floats in [-1, 1] (v / 127.5 - 1) one batch at a time. Dynamic binarization
belongs to the model, not to the data layer (MODEL.md section 1).

Files are read from their standard names under ``root``. A missing file is downloaded
from its canonical source (progress bar, checksum, atomic rename) when allowed; when
that fails, the error names the file, the URL and where to put it by hand.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

DATASETS = ("mnist", "omniglot", "cifar10", "npz")
# The validation split is a fixed function of the data: it must not move when the
# training seed changes, or validation losses of two runs would not be comparable.
SPLIT_SEED = 20240101


class DataError(RuntimeError):
    """A dataset file is missing, cannot be downloaded, or is corrupt."""


@dataclass(frozen=True)
class Remote:
    """A downloadable file: its name, mirror URLs (first is canonical) and md5."""

    filename: str
    urls: tuple[str, ...]
    md5: str


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                  "http://yann.lecun.com/exdb/mnist/")
REMOTES = {
    "mnist_train": Remote("train-images-idx3-ubyte.gz",
                          tuple(m + "train-images-idx3-ubyte.gz" for m in _MNIST_MIRRORS),
                          "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "mnist_test": Remote("t10k-images-idx3-ubyte.gz",
                         tuple(m + "t10k-images-idx3-ubyte.gz" for m in _MNIST_MIRRORS),
                         "9fb629c4189551a2d022fa330f9573f3"),
    "omniglot": Remote("chardata.mat",
                       ("https://raw.githubusercontent.com/yburda/iwae/master/datasets/"
                        "OMNIGLOT/chardata.mat",),
                       "21ecaf34373511aa7691cf2e0802aa3d"),
    "cifar10": Remote("cifar-10-python.tar.gz",
                      ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                      "c58f30108f718f92721af3b95e74349a"),
}


@dataclass
class ImageData:
    """uint8 image splits (N, C, H, W); ``test`` is None when the source has none."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

    def split(self, name: str) -> np.ndarray:
        """Return split ``train``, ``val`` or ``test``; a missing split raises DataError."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; use train, val or test")
        arr = getattr(self, name)
        if arr is None:
            raise DataError(f"dataset {self.name!r} has no {name} split "
                            "(for npz, store test images under key 'x_test')")
        return arr


# ----------------------------------------------------------------------------- files

def md5sum(path: str, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(remote: Remote, dest: str, progress: bool = True) -> str:
    """Fetch ``remote`` to ``dest``: try each mirror, verify the md5, rename atomically.

    The partial file lives beside ``dest`` under a unique name so that an interrupted
    or concurrent download never leaves a truncated file under the real name.
    """
    from tqdm import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    errors = []
    for url in remote.urls:
        tmp = f"{dest}.part-{os.getpid()}"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename,
                          disable=not progress) as bar:
                    for block in iter(lambda: resp.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
            got = md5sum(tmp)
            if got != remote.md5:
                raise DataError(f"checksum mismatch for {url}: md5 {got}, expected {remote.md5}")
            os.replace(tmp, dest)
            return dest
        except (OSError, urllib.error.URLError, DataError) as e:
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataError(
        f"{remote.filename} is missing at {dest} and could not be downloaded:\n  "
        + "\n  ".join(errors)
        + f"\nDownload it from {remote.urls[0]} (md5 {remote.md5}) and place it at {dest}.")


def _find_or_fetch(root: str, remote: Remote, candidates: tuple[str, ...],
                   download_ok: bool) -> str:
    """Return the first existing candidate path under ``root``, else download ``remote``."""
    for cand in candidates:
        path = os.path.join(root, cand)
        if os.path.exists(path):
            return path
    dest = os.path.join(root, remote.filename)
    if not download_ok:
        raise DataError(f"{remote.filename} not found under {root} (looked for "
                        f"{', '.join(candidates)}); download it from {remote.urls[0]} "
                        f"(md5 {remote.md5}) and place it at {dest}")
    return download(remote, dest)


# ----------------------------------------------------------------------------- formats

def read_idx_images(path: str) -> np.ndarray:
    """Read an idx3-ubyte image file (optionally gzipped) into uint8 (N, 1, H, W)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e} (corrupt or truncated file; delete it "
                        "to download it again)") from e
    if len(raw) < 16:
        raise DataError(f"{path} is too short to be an idx image file ({len(raw)} bytes)")
    magic, n, h, w = struct.unpack(">IIII", raw[:16])
    if magic != 0x00000803:
        raise DataError(f"{path} is not an idx3-ubyte image file (magic {magic:#010x}, "
                        "expected 0x00000803)")
    if len(raw) != 16 + n * h * w:
        raise DataError(f"{path} is truncated or corrupt: header says {n}x{h}x{w} images "
                        f"({16 + n * h * w} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w).copy()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batch files that resolves only numpy array globals.

    The CIFAR10 python batches are pickles by format; restricting the globals means
    a tampered file cannot run code while it is read.
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(raw: bytes, where: str) -> np.ndarray:
    """Decode one CIFAR10 python batch (bytes of the pickle) into uint8 (N, 3, 32, 32)."""
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
        data = d["data"] if "data" in d else d[b"data"]
        data = np.asarray(data, dtype=np.uint8)
    except Exception as e:  # any decoding failure means the file is not a CIFAR batch
        raise DataError(f"{where} is not a valid CIFAR10 python batch: {e}") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: 'data' has shape {data.shape}, expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32)


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)


def read_cifar10(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read (train, test) from ``cifar-10-batches-py/`` or the ``.tar.gz`` archive."""
    def batches(get, names):
        return np.concatenate([get(n) for n in names])

    if os.path.isdir(path):
        def get(name):
            fp = os.path.join(path, name)
            if not os.path.exists(fp):
                raise DataError(f"CIFAR10 batch {fp} is missing; re-extract "
                                f"{REMOTES['cifar10'].filename} from {REMOTES['cifar10'].urls[0]}")
            with open(fp, "rb") as f:
                return read_cifar_batch(f.read(), fp)
        return batches(get, CIFAR_TRAIN), batches(get, CIFAR_TEST)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}

            def get(name):
                if name not in members:
                    raise DataError(f"{path} has no member {name}; is it cifar-10-python.tar.gz?")
                return read_cifar_batch(tar.extractfile(members[name]).read(), f"{path}:{name}")
            return batches(get, CIFAR_TRAIN), batches(get, CIFAR_TEST)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e} (corrupt or truncated archive; delete it to "
                        f"download it again from {REMOTES['cifar10'].urls[0]})") from e


def read_omniglot(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read (train, test) uint8 (N, 1, 28, 28) from the IWAE ``chardata.mat``.

    The file stores each image as a column of 784 values in [0, 1], pixel index
    ``col * 28 + row`` (column-major), so the row-major image is the transpose of the
    C-order reshape. This matches the IWAE loader and the research code.
    """
    try:
        import scipy.io
    except ImportError as e:
        raise DataError(f"reading {path} needs scipy: pip install scipy ({e})") from e
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a damaged file
        raise DataError(f"cannot read {path}: {e} (corrupt file? download it again from "
                        f"{REMOTES['omniglot'].urls[0]})") from e
    out = []
    for key in ("data", "testdata"):
        if key not in mat:
            raise DataError(f"{path} has no key {key!r}; is it the IWAE OMNIGLOT chardata.mat?")
        a = np.asarray(mat[key])
        if a.ndim != 2 or a.shape[0] != 784:
            raise DataError(f"{path}: {key!r} has shape {a.shape}, expected (784, N)")
        imgs = a.T.reshape(-1, 28, 28).transpose(0, 2, 1)
        # The values are binary, so rounding equals the research code's truncation.
        out.append(np.rint(255.0 * np.clip(imgs, 0.0, 1.0)).astype(np.uint8)[:, None])
    return out[0], out[1]


def to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """Bring (N,H,W), (N,H,W,C) or (N,C,H,W) uint8 images to contiguous (N,C,H,W)."""
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 in 0..255, got dtype {x.dtype}")
    if x.ndim == 3 and x.shape[1] == x.shape[2]:
        return np.ascontiguousarray(x[:, None])
    if x.ndim == 4:
        if x.shape[1] in (1, 3) and x.shape[2] == x.shape[3]:
            return np.ascontiguousarray(x)
        if x.shape[3] in (1, 3) and x.shape[1] == x.shape[2]:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(f"{where}: cannot interpret image array of shape {x.shape}; expected "
                    "(N,H,W), (N,H,W,C) or (N,C,H,W) square images with C in {1, 3}")


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read (x, x_test or None) from an ``.npz`` file (pickled objects are refused)."""
    if not os.path.isfile(path):
        raise DataError(f"npz dataset {path} not found; pass --data-root FILE.npz with uint8 "
                        "images under key 'x' (and optionally 'x_test')")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise DataError(f"{path} has no key 'x' (keys: {f.files}); store training "
                                "images under 'x'")
            x = to_nchw(f["x"], f"{path}:x")
            x_test = to_nchw(f["x_test"], f"{path}:x_test") if "x_test" in f.files else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if x_test is not None and x_test.shape[1:] != x.shape[1:]:
        raise DataError(f"{path}: x_test images {x_test.shape[1:]} differ from x {x.shape[1:]}")
    return x, x_test


# ----------------------------------------------------------------------------- splits

def split_train_val(x: np.ndarray, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve ``val_size`` random images (fixed seed) out of ``x``; train keeps file order."""
    n = len(x)
    if not 0 < val_size < n:
        raise DataError(f"validation size {val_size} must be in (0, {n}) for {n} images")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    val_idx = np.sort(perm[:val_size])
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    return x[mask], x[val_idx]


def load_dataset(name: str, root: str, val_size: int | None = None, val_fraction: float = 0.1,
                 download_ok: bool = True) -> ImageData:
    """Load dataset ``name`` from ``root`` (a directory; for npz the ``.npz`` file).

    Args:
        val_size: validation images carved from the training file (paper: 5000 MNIST,
            1000 OMNIGLOT, 5000 CIFAR10, i.e. ``Config.val_size``); ignored for npz.
        val_fraction: fraction of ``x`` used for validation for npz files.
        download_ok: download missing files from their canonical source.
    """
    if name == "mnist":
        paths = []
        for key, stem in (("mnist_train", "train-images-idx3-ubyte"),
                          ("mnist_test", "t10k-images-idx3-ubyte")):
            cands = tuple(os.path.join(d, stem + ext) for d in ("", os.path.join("MNIST", "raw"))
                          for ext in (".gz", ""))
            paths.append(_find_or_fetch(root, REMOTES[key], cands, download_ok))
        full, test = read_idx_images(paths[0]), read_idx_images(paths[1])
        val_size = 5000 if val_size is None else val_size
    elif name == "omniglot":
        path = _find_or_fetch(root, REMOTES["omniglot"],
                              ("chardata.mat", os.path.join("OMNIGLOT", "chardata.mat")), download_ok)
        full, test = read_omniglot(path)
        val_size = 1000 if val_size is None else val_size
    elif name == "cifar10":
        cands = ("cifar-10-batches-py", "cifar-10-python.tar.gz")
        path = _find_or_fetch(root, REMOTES["cifar10"], cands, download_ok)
        full, test = read_cifar10(path)
        val_size = 5000 if val_size is None else val_size
    elif name == "npz":
        full, test = read_npz(root)
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        val_size = max(1, int(round(val_fraction * len(full))))
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    train, val = split_train_val(full, val_size)
    return ImageData(name, train, val, test)


# ----------------------------------------------------------------------------- batches

def to_float(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (v / 127.5 - 1)."""
    return batch_u8.float().div_(127.5).sub_(1.0)


class BatchIterator:
    """Batches of float images in [-1, 1] from uint8 (N, C, H, W) arrays.

    The order of epoch ``e`` is a pure function of (``seed``, ``e``) through
    ``torch.utils.data.DistributedSampler``, so each rank of a distributed run sees its
    own shard and a resumed run can skip the batches of an epoch it already consumed
    (``iterate(epoch, start_batch)``).

    Args:
        images: uint8 array (N, C, H, W).
        batch_size: images per batch on this process.
        shuffle: shuffled epochs (training); unshuffled iteration visits every image of
            this rank's stride ``rank::world_size`` once (evaluation).
        drop_last: keep every batch full.
        rank, world_size: this process's shard.
        hflip: random horizontal flips (the research code's CIFAR10 augmentation),
            drawn from a generator seeded by (seed, epoch).
        device: where batches are placed (conversion to float happens there).
    """

    def __init__(self, images: np.ndarray, batch_size: int, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 hflip: bool = False, device: str | torch.device = "cpu"):
        from torch.utils.data import DistributedSampler

        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N,C,H,W) images, got {images.dtype} {images.shape}")
        self.images = torch.from_numpy(images)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.hflip = hflip
        self.device = torch.device(device)
        # The sampler's drop_last keeps the per-rank training shards equally long, so no
        # rank waits in a collective for a batch the others do not have. Unshuffled
        # (evaluation) shards are plain strides instead: every image exactly once, with
        # no padding duplicates, and callers reduce sums rather than per-batch values.
        self.sampler = DistributedSampler(range(len(images)), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
        if shuffle and len(self) == 0:
            raise ValueError(f"{len(images)} images give no full batch of {batch_size} "
                             f"on {world_size} process(es)")

    def _indices(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.rank, len(self.images), self.world_size)
        self.sampler.set_epoch(epoch)
        return torch.tensor(list(self.sampler), dtype=torch.long)

    def __len__(self) -> int:
        n = len(self.sampler) if self.shuffle else len(range(self.rank, len(self.images), self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def iterate(self, epoch: int = 0, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Yield the batches of ``epoch`` from batch index ``start_batch`` on."""
        idx = self._indices(epoch)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch) if self.hflip else None
        flips = torch.rand(len(idx), generator=gen) < 0.5 if self.hflip else None
        for b in range(start_batch, len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            x = self.images[idx[sl]]  # advanced indexing copies, so flipping is safe
            if flips is not None:
                f = flips[sl]
                x[f] = x[f].flip(-1)
            yield to_float(x.to(self.device, non_blocking=True))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iterate(0)


def first_images(images: np.ndarray, n: int, batch_size: int = 1000) -> Iterator[torch.Tensor]:
    """The first ``n`` images as float batches (the input of ``set_dct_scale``)."""
    n = min(n, len(images))
    for i in range(0, n, batch_size):
        yield to_float(torch.from_numpy(images[i:min(i + batch_size, n)]))
