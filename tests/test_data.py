"""Dataset readers on tiny files in the real formats, downloads, splits and batching."""
import gzip
import hashlib
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch

import datafiles
from dvpvae import data as D
from dvpvae.data import BatchIterator, DataError, load_dataset


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


# ----------------------------------------------------------------------------- MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_roundtrip_and_split(tmp_path, gz):
    tr, te = datafiles.write_mnist(str(tmp_path), n_train=40, n_test=8, gz=gz)
    d = load_dataset("mnist", str(tmp_path), val_size=10, download_ok=False)
    assert d.train.shape == (30, 1, 28, 28) and d.val.shape == (10, 1, 28, 28)
    assert d.train.dtype == np.uint8
    np.testing.assert_array_equal(d.test, te)
    # train keeps file order, val is a subset, together they are the file
    rows = {r.tobytes() for r in tr}
    assert {r.tobytes() for r in d.train} | {r.tobytes() for r in d.val} == rows
    assert not {r.tobytes() for r in d.train} & {r.tobytes() for r in d.val}
    idx = [next(i for i, r in enumerate(tr) if np.array_equal(r, t)) for t in d.train]
    assert idx == sorted(idx)
    # the split is a function of the data only
    d2 = load_dataset("mnist", str(tmp_path), val_size=10, download_ok=False)
    np.testing.assert_array_equal(d.val, d2.val)


def test_mnist_torchvision_layout(tmp_path):
    datafiles.write_mnist(str(tmp_path / "MNIST" / "raw"), n_train=12, n_test=3)
    d = load_dataset("mnist", str(tmp_path), val_size=2, download_ok=False)
    assert len(d.train) == 10 and len(d.test) == 3


def test_float_conversion_is_exact():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = D.to_float(u8)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 127.5 - 1,
                               rtol=0, atol=0)
    assert x.min() == -1 and x.max() == 1


def test_idx_truncated_bad_magic_and_bad_gzip(tmp_path):
    p = datafiles.write_idx(str(tmp_path / "a" / "train-images-idx3-ubyte"), datafiles.images(3)[:, 0])
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        D.read_idx_images(p)
    open(p, "wb").write(b"\x00\x00\x08\x01" + raw[4:])
    with pytest.raises(DataError, match="magic"):
        D.read_idx_images(p)
    g = str(tmp_path / "b.gz")
    open(g, "wb").write(gzip.compress(raw)[:30])
    with pytest.raises(DataError, match="b.gz"):
        D.read_idx_images(g)


def test_missing_file_no_download_names_file_url_and_place(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", str(tmp_path), download_ok=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "https://" in msg
    assert os.path.join(str(tmp_path), "train-images-idx3-ubyte.gz") in msg


def test_missing_file_without_network(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path))
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and D.REMOTES["cifar10"].urls[0] in msg
    assert "name resolution" in msg and str(tmp_path) in msg
    assert os.listdir(tmp_path) == []  # no partial file left behind


def test_download_verifies_checksum_and_renames_atomically(tmp_path, monkeypatch):
    src = tmp_path / "src"
    datafiles.write_mnist(str(src), n_train=12, n_test=4)
    remotes = {}
    for key, name in (("mnist_train", "train-images-idx3-ubyte.gz"), ("mnist_test", "t10k-images-idx3-ubyte.gz")):
        blob = (src / name).read_bytes()
        remotes[key] = D.Remote(name, ((src / name).as_uri(),), _md5(blob))
    monkeypatch.setattr(D, "REMOTES", {**D.REMOTES, **remotes})
    root = tmp_path / "root"
    d = load_dataset("mnist", str(root), val_size=2)
    assert len(d.train) == 10
    assert sorted(os.listdir(root)) == ["t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"]

    bad = D.Remote("chardata.mat", ((src / "train-images-idx3-ubyte.gz").as_uri(),), "0" * 32)
    with pytest.raises(DataError, match="checksum mismatch"):
        D.download(bad, str(tmp_path / "x" / "chardata.mat"), progress=False)
    assert os.listdir(tmp_path / "x") == []


# ----------------------------------------------------------------------------- CIFAR10

@pytest.mark.parametrize("tar", [True, False])
def test_cifar_tarball_and_folder(tmp_path, tar):
    tr, te = datafiles.write_cifar(str(tmp_path), per_batch=4, tar=tar)
    d = load_dataset("cifar10", str(tmp_path), val_size=5, download_ok=False)
    assert d.image_shape == (3, 32, 32)
    assert len(d.train) == 15 and len(d.val) == 5
    np.testing.assert_array_equal(d.test, te)
    # the stored row is R plane, then G, then B (channel-first)
    row = te[0].reshape(-1)
    assert d.test[0, 1, 0, 0] == row[1024] and d.test[0, 2, 31, 31] == row[3071]


def test_cifar_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    d = tmp_path / "cifar-10-batches-py"
    datafiles.write_cifar(str(tmp_path), tar=False)
    (d / "data_batch_1").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", str(tmp_path), download_ok=False)
    assert not (tmp_path / "pwned").exists()


def test_cifar_corrupt_archive_and_missing_batch(tmp_path):
    datafiles.write_cifar(str(tmp_path / "a"))
    p = tmp_path / "a" / "cifar-10-python.tar.gz"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", str(tmp_path / "a"), download_ok=False)
    datafiles.write_cifar(str(tmp_path / "b"), tar=False)
    os.remove(tmp_path / "b" / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", str(tmp_path / "b"), download_ok=False)


# ----------------------------------------------------------------------------- OMNIGLOT

def test_omniglot_orientation_matches_research_code(tmp_path):
    import scipy.io

    tr, te = datafiles.write_omniglot(str(tmp_path), n_train=30, n_test=6)
    d = load_dataset("omniglot", str(tmp_path), val_size=10, download_ok=False)
    assert len(d.train) == 20 and len(d.val) == 10
    np.testing.assert_array_equal(d.test, te)
    # The research code reads the file as reshape((28, 28, -1)).transpose((2, 1, 0)).
    mat = scipy.io.loadmat(str(tmp_path / "chardata.mat"))
    ref = (255 * mat["testdata"].reshape((28, 28, -1)).transpose((2, 1, 0))).astype(np.uint8)
    np.testing.assert_array_equal(d.test[:, 0], ref)
    assert not np.array_equal(ref, ref.transpose(0, 2, 1))  # orientation really is tested


def test_omniglot_bad_files(tmp_path):
    import scipy.io

    scipy.io.savemat(str(tmp_path / "chardata.mat"), {"data": np.zeros((784, 3))})
    with pytest.raises(DataError, match="testdata"):
        load_dataset("omniglot", str(tmp_path), download_ok=False)
    (tmp_path / "chardata.mat").write_bytes(b"MATLAB garbage" * 10)
    with pytest.raises(DataError, match="chardata.mat"):
        load_dataset("omniglot", str(tmp_path), download_ok=False)


# ----------------------------------------------------------------------------- npz

@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_layouts(tmp_path, layout):
    base = datafiles.images(20, c=3 if layout != "NHW" else 1, size=8)
    x = {"NHW": base[:, 0], "NHWC": base.transpose(0, 2, 3, 1), "NCHW": base}[layout]
    np.savez(tmp_path / "d.npz", x=x, x_test=x[:3])
    d = load_dataset("npz", str(tmp_path / "d.npz"), val_fraction=0.25)
    assert len(d.train) == 15 and len(d.val) == 5
    np.testing.assert_array_equal(d.test, base[:3])


def test_npz_bad_inputs(tmp_path):
    p = str(tmp_path / "d.npz")
    np.savez(p, x=np.zeros((4, 8, 8), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset("npz", p)
    np.savez(p, images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match="no key 'x'"):
        load_dataset("npz", p)
    np.savez(p, x=np.zeros((4, 5, 8, 8), np.uint8))
    with pytest.raises(DataError, match="cannot interpret"):
        load_dataset("npz", p)
    np.savez(p, x=np.zeros((4, 8, 9), np.uint8))  # not square
    with pytest.raises(DataError, match=r"d.npz:x: cannot interpret .*\(4, 8, 9\)"):
        load_dataset("npz", p)
    np.savez(p, x=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(DataError):
        load_dataset("npz", p)
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz", str(tmp_path / "missing.npz"))
    np.savez(p, x=np.zeros((10, 8, 8), np.uint8))
    d = load_dataset("npz", p)
    with pytest.raises(DataError, match="x_test"):
        d.split("test")


# ----------------------------------------------------------------------------- batches

def test_batch_iterator_order_is_a_function_of_seed_and_epoch():
    x = datafiles.images(50, size=4)
    a, b = BatchIterator(x, 8, seed=3), BatchIterator(x, 8, seed=3)
    assert len(a) == 6
    e0 = [t.clone() for t in a.iterate(0)]
    assert all(torch.equal(u, v) for u, v in zip(e0, b.iterate(0)))
    assert not torch.equal(torch.cat(e0), torch.cat(list(a.iterate(1))))
    # resuming inside an epoch yields the remaining batches of the same order
    assert all(torch.equal(u, v) for u, v in zip(e0[4:], a.iterate(0, start_batch=4)))
    assert all(t.shape == (8, 1, 4, 4) and t.dtype == torch.float32 for t in e0)


def test_batch_iterator_shards_and_eval_stride():
    x = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
    seen = []
    for r in range(2):
        it = BatchIterator(x, 3, seed=0, rank=r, world_size=2)
        got = torch.cat(list(it.iterate(5)))
        assert len(it) == 3 and len(got) == 9
        seen.append(set(((got + 1) * 127.5).round().int().flatten().tolist()))
    assert not seen[0] & seen[1]
    evals = []
    for r in range(2):
        it = BatchIterator(x, 5, shuffle=False, drop_last=False, rank=r, world_size=2)
        evals += ((torch.cat(list(it.iterate())) + 1) * 127.5).round().int().flatten().tolist()
    assert sorted(evals) == list(range(23))  # every image exactly once, no padding


def test_hflip_is_deterministic_and_partial():
    x = datafiles.images(64, c=3, size=4)
    it = BatchIterator(x, 64, seed=1, hflip=True)
    a, b = next(it.iterate(2)), next(it.iterate(2))
    assert torch.equal(a, b)
    plain = next(BatchIterator(x, 64, seed=1).iterate(2))
    flipped = (a != plain).flatten(1).any(1)
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(a[flipped], plain[flipped].flip(-1))
