"""Writers of tiny dataset files in the real on-disk formats, for the data/train/eval tests."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np


def images(n: int, c: int = 1, size: int = 28, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 (n, c, size, size) images with every value 0..255 likely present."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, c, size, size), dtype=np.uint8)


def write_idx(path: str, imgs: np.ndarray) -> str:
    """idx3-ubyte file (gzipped when ``path`` ends in .gz) of uint8 (N, H, W) images."""
    n, h, w = imgs.shape
    raw = struct.pack(">IIII", 0x00000803, n, h, w) + imgs.astype(np.uint8).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)
    return path


def write_mnist(root: str, n_train: int = 40, n_test: int = 8, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """train/t10k idx files under ``root``; returns the (N, 1, 28, 28) arrays written."""
    tr, te = images(n_train, seed=1), images(n_test, seed=2)
    ext = ".gz" if gz else ""
    write_idx(os.path.join(root, "train-images-idx3-ubyte" + ext), tr[:, 0])
    write_idx(os.path.join(root, "t10k-images-idx3-ubyte" + ext), te[:, 0])
    return tr, te


def cifar_batch_bytes(imgs: np.ndarray) -> bytes:
    """A CIFAR10 python batch: a pickled dict with a (N, 3072) uint8 'data' array."""
    d = {"batch_label": "testing", "labels": [0] * len(imgs),
         "data": imgs.reshape(len(imgs), -1), "filenames": [f"{i}.png" for i in range(len(imgs))]}
    return pickle.dumps(d, protocol=2)


def write_cifar(root: str, per_batch: int = 4, tar: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-python.tar.gz (or the extracted folder) with 5 train batches + test_batch."""
    batches = {f"data_batch_{i}": images(per_batch, 3, 32, seed=10 + i) for i in range(1, 6)}
    batches["test_batch"] = images(per_batch, 3, 32, seed=20)
    os.makedirs(root, exist_ok=True)
    if tar:
        with tarfile.open(os.path.join(root, "cifar-10-python.tar.gz"), "w:gz") as t:
            for name, arr in batches.items():
                data = cifar_batch_bytes(arr)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    else:
        d = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(d, exist_ok=True)
        for name, arr in batches.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(cifar_batch_bytes(arr))
    train = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    return train, batches["test_batch"]


def omniglot_columns(imgs: np.ndarray) -> np.ndarray:
    """(784, N) float columns in [0, 1], pixel (row r, col c) at index c * 28 + r."""
    return np.stack([im.T.reshape(-1) for im in imgs[:, 0]], axis=1).astype(np.float64) / 255.0


def write_omniglot(root: str, n_train: int = 30, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """chardata.mat with binary images (as the IWAE file); returns the uint8 arrays."""
    import scipy.io

    tr = (images(n_train, seed=3) > 127).astype(np.uint8) * 255
    te = (images(n_test, seed=4) > 127).astype(np.uint8) * 255
    os.makedirs(root, exist_ok=True)
    scipy.io.savemat(os.path.join(root, "chardata.mat"),
                     {"data": omniglot_columns(tr), "testdata": omniglot_columns(te)})
    return tr, te


def tiny_training_npz(path) -> str:
    """80 binary-ish 28x28 images with 10 test images: 72 train (4 batches of 16) + 8 val."""
    x = ((images(90, seed=7) > 160) * 255).astype(np.uint8)[:, 0]
    np.savez(path, x=x[:80], x_test=x[80:])
    return str(path)


def training_argv(npz: str, out, *extra: str) -> list[str]:
    """``python -m dvpvae.train`` arguments for a short single-thread run of the tiny preset
    on ``npz`` (``tiny_training_npz``), writing to ``out``."""
    return ["--preset", "tiny", "--data", "npz", "--data-root", npz, "--val-fraction", "0.1",
            "--out", str(out), "--threads", "1", "--num-samples", "4", "--log-every", "1",
            "--warmup-epochs", "1", *extra]


def metric_rows(out, kind: str = "train") -> list[dict]:
    """The rows of kind ``kind`` ("train", "val", ...) in a training run's metrics.jsonl."""
    from dvpvae.plotting import read_metrics

    return [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]
