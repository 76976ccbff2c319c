"""LIBSVM parsing, the data-directory rule, (mocked) downloads and the synthetic stand-in."""

import bz2
import gzip
import io
from pathlib import Path

import numpy as np
import pytest

from zojax import datasets
from zojax.datasets import (
    LIBSVM_URL,
    LibsvmInfo,
    data_root,
    load_libsvm,
    parse_libsvm,
    synthetic_libsvm,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

TINY_TRAIN = "+1 1:0.5 3:1\n\n# a comment line\n-1 2:2.0   # trailing comment\n0\n1 4:-0.25\n"
TINY_TEST = "-1 1:1\n+1 2:1 4:3\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bz2":
        path.write_bytes(bz2.compress(text.encode()))
    else:
        path.write_text(text)
    return path


# --- parser --------------------------------------------------------------------------------------


def test_parse_small_file(tmp_path):
    inputs, labels = parse_libsvm(write(tmp_path / "tiny", TINY_TRAIN))
    assert inputs.dtype == labels.dtype == np.float32
    np.testing.assert_array_equal(
        inputs, [[0.5, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, -0.25]]
    )
    np.testing.assert_array_equal(labels, [1, -1, -1, 1])  # label 0 maps to -1
    wide, _ = parse_libsvm(tmp_path / "tiny", num_features=6)
    assert wide.shape == (4, 6)
    np.testing.assert_array_equal(wide[:, :4], inputs)


def test_parse_crlf_and_empty_file(tmp_path):
    (tmp_path / "crlf").write_bytes(b"-1 2:1\r\n+1 1:1\r\n")
    inputs, labels = parse_libsvm(tmp_path / "crlf", num_features=2)
    np.testing.assert_array_equal(inputs, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(labels, [-1, 1])
    inputs, labels = parse_libsvm(write(tmp_path / "empty", "\n"), num_features=3)
    assert inputs.shape == (0, 3) and labels.shape == (0,)


@pytest.mark.parametrize(
    "bad_line", ["+1 3:abc", "+1 3", "+1 3:1:2", "one 1:1", "+1 x:1"], ids=str
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line):
    path = write(tmp_path / "broken", f"+1 1:1\n\n{bad_line}\n-1 2:1\n")
    with pytest.raises(ValueError, match=r"broken:3: malformed") as error:
        parse_libsvm(path, num_features=5)
    assert str(path) in str(error.value) and repr(bad_line) in str(error.value)


def test_bad_label_and_index_name_file_and_line(tmp_path):
    path = write(tmp_path / "labels", "+1 1:1\n2 1:1\n")
    with pytest.raises(ValueError, match=r"labels:2: label '2'"):
        parse_libsvm(path)
    path = write(tmp_path / "wide", "+1 1:1\n-1 2:1\n\n-1 1:1 7:1\n")
    with pytest.raises(ValueError, match=r"wide:4: feature index 7 outside 1..5: '-1 1:1 7:1'"):
        parse_libsvm(path, num_features=5)
    with pytest.raises(ValueError, match=r"zero:2: feature index 0"):
        parse_libsvm(write(tmp_path / "zero", "+1 1:1\n-1 0:1\n"))


# --- data directory and loading ------------------------------------------------------------------


def test_data_root_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOJAX_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("ZOJAX_DATA_DIR")
    assert data_root() == tmp_path / "xdg" / "zojax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "zojax"


def test_missing_files_error_lists_full_paths(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_libsvm must not download without download=True")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", no_network)
    write(tmp_path / "libsvm" / "a5a", "+1 1:1\n")
    with pytest.raises(FileNotFoundError) as error:
        load_libsvm("a5a", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "libsvm" / "a5a.t") in message
    assert f"{tmp_path / 'libsvm' / 'a5a'}\n" not in message  # the train file is there
    assert "download=True" in message and "$ZOJAX_DATA_DIR" in message and "data_dir" in message
    monkeypatch.setenv("ZOJAX_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere/libsvm/w5a.t"):
        load_libsvm("w5a")


def test_load_bz2_and_unknown_name(tmp_path, monkeypatch):
    write(tmp_path / "libsvm" / "tiny.bz2", TINY_TRAIN)
    write(tmp_path / "libsvm" / "tiny.t.bz2", TINY_TEST)
    monkeypatch.setenv("ZOJAX_DATA_DIR", str(tmp_path))
    data = load_libsvm("tiny")
    assert data.name == "tiny"
    assert data.train_inputs.shape == (4, 4) and data.test_inputs.shape == (2, 4)
    np.testing.assert_array_equal(data.test_inputs, [[1, 0, 0, 0], [0, 1, 0, 3]])
    np.testing.assert_array_equal(data.test_labels, [-1, 1])


def test_known_dataset_row_count_is_checked(tmp_path):
    write(tmp_path / "libsvm" / "a5a", "+1 1:1\n-1 123:1\n")
    write(tmp_path / "libsvm" / "a5a.t", "+1 1:1\n")
    with pytest.raises(ValueError, match=r"a5a: 2 rows, but the official a5a has 6414"):
        load_libsvm("a5a", data_dir=tmp_path)


def test_download_fetches_only_missing_files(tmp_path, monkeypatch):
    served = {"a1a": TINY_TRAIN, "a1a.t": TINY_TEST}
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        return io.BytesIO(served[url.removeprefix(LIBSVM_URL)].encode())

    monkeypatch.setattr(datasets.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setitem(datasets.LIBSVM_DATASETS, "a1a", LibsvmInfo(4, 2, 123))
    write(tmp_path / "libsvm" / "a1a", TINY_TRAIN)
    data = load_libsvm("a1a", data_dir=tmp_path, download=True)
    assert requested == [LIBSVM_URL + "a1a.t"]
    assert (tmp_path / "libsvm" / "a1a.t").read_text() == TINY_TEST
    assert data.train_inputs.shape == (4, 123) and data.test_inputs.shape == (2, 123)
    load_libsvm("a1a", data_dir=tmp_path, download=True)
    assert len(requested) == 1  # nothing missing, nothing fetched

    monkeypatch.setitem(datasets.LIBSVM_DATASETS, "a2a", LibsvmInfo(9, 2, 123))
    served.update({"a2a": TINY_TRAIN, "a2a.t": TINY_TEST})
    with pytest.raises(ValueError, match="official a2a has 9"):
        load_libsvm("a2a", data_dir=tmp_path, download=True)
    with pytest.raises(ValueError, match="unknown LIBSVM dataset 'nope'"):
        load_libsvm("nope", data_dir=tmp_path, download=True)


# --- synthetic stand-in --------------------------------------------------------------------------


def test_synthetic_a5a_shapes_sparsity_and_difficulty():
    data = synthetic_libsvm(seed=0, like="a5a")
    assert data.name == "synthetic"
    assert data.train_inputs.shape == (6414, 123) and data.test_inputs.shape == (26147, 123)
    assert data.train_inputs.dtype == data.train_labels.dtype == np.float32
    inputs = np.concatenate([data.train_inputs, data.test_inputs])
    assert set(np.unique(inputs)) == {0.0, 1.0}
    np.testing.assert_array_equal(inputs.sum(axis=1), 14.0)  # one category per attribute
    labels = np.concatenate([data.train_labels, data.test_labels])
    assert set(np.unique(labels)) == {-1.0, 1.0}
    assert 0.22 < np.mean(labels > 0) < 0.26

    # a least-squares linear classifier lands in the paper's accuracy range (majority: ~0.76)
    design = np.c_[np.ones(len(data.train_inputs)), data.train_inputs]
    w = np.linalg.lstsq(design, data.train_labels, rcond=None)[0]
    scores = np.c_[np.ones(len(data.test_inputs)), data.test_inputs] @ w
    assert 0.80 < np.mean(np.where(scores >= 0, 1.0, -1.0) == data.test_labels) < 0.87


def test_synthetic_is_deterministic_and_mimics_w5a():
    first, second = synthetic_libsvm(seed=3, like="a1a"), synthetic_libsvm(seed=3, like="a1a")
    for a, b in zip(first[:4], second[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(synthetic_libsvm(seed=4, like="a1a").train_labels,
                              first.train_labels)
    w5a = synthetic_libsvm(like="w5a")
    assert w5a.train_inputs.shape == (9888, 300) and w5a.test_inputs.shape == (39861, 300)
    assert 10.5 < w5a.train_inputs.sum(axis=1).mean() < 12.5
    assert 0.02 < np.mean(w5a.train_labels > 0) < 0.04
    with pytest.raises(ValueError, match="unknown LIBSVM dataset"):
        synthetic_libsvm(like="mnist")


# --- the real files in ../shared/data ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shapes, positives",
    [("w5a", ((9888, 300), (39861, 300)), (281, 1198)),
     ("a7a", ((16100, 123), (16461, 123)), (3918, 3923))],
)
def test_real_libsvm_files(name, shapes, positives):
    folder = SHARED_DATA / "libsvm"
    if not (folder / name).is_file() or not (folder / f"{name}.t").is_file():
        pytest.skip(f"LIBSVM {name} not found at {folder}; the shared data is not available here")
    data = load_libsvm(name, data_dir=SHARED_DATA)
    assert (data.train_inputs.shape, data.test_inputs.shape) == shapes
    assert (int(np.sum(data.train_labels > 0)), int(np.sum(data.test_labels > 0))) == positives
    assert set(np.unique(data.train_labels)) == {-1.0, 1.0}
    assert set(np.unique(data.train_inputs)) == {0.0, 1.0}


# ---------------------------------------------------------------------------------------------
# IDX files


def _write_idx(path, array, gz=False):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _idx_folder(root, name="mnist", n_train=5, n_test=3, gz=False):
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_file, labels_file = datasets.IDX_FILES[split]
        images = rng.integers(0, 256, (n, 4, 3))
        labels = rng.integers(0, 10, n)
        _write_idx(folder / (images_file + (".gz" if gz else "")), images, gz)
        _write_idx(folder / (labels_file + (".gz" if gz else "")), labels, gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_reads_plain_and_gzipped_files(tmp_path, gz):
    arrays = _idx_folder(tmp_path, "fashion_mnist", gz=gz)
    (x, y), (x_test, y_test) = datasets.load_idx("fashion_mnist", data_dir=tmp_path)
    assert x.shape == (5, 4, 3) and x_test.shape == (3, 4, 3)
    assert x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, arrays["train"][0] / 255, rtol=1e-6)
    np.testing.assert_array_equal(y_test, arrays["test"][1])
    assert 0 <= x.min() and x.max() <= 1


def test_load_idx_reads_the_data_dir_from_the_environment(tmp_path, monkeypatch):
    _idx_folder(tmp_path)
    monkeypatch.setenv("ZOJAX_DATA_DIR", str(tmp_path))
    assert datasets.load_idx("mnist")[0][0].shape == (5, 4, 3)


def test_load_idx_says_which_files_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        datasets.load_idx("mnist", data_dir=tmp_path)
    for files in datasets.IDX_FILES.values():
        for f in files:
            assert str(tmp_path / "mnist" / f) in str(error.value)
    _idx_folder(tmp_path)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as error:
        datasets.load_idx("mnist", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(error.value)
    assert "train-images" not in str(error.value)


@pytest.mark.parametrize("damage", ["magic", "truncated", "count"])
def test_load_idx_names_a_malformed_file(tmp_path, damage):
    _idx_folder(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    data = path.read_bytes()
    if damage == "magic":
        path.write_bytes(bytes([0, 0, 0x08, 0x01]) + data[4:])
    elif damage == "truncated":
        path.write_bytes(data[:-5])
    else:
        _write_idx(path, np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        datasets.load_idx("mnist", data_dir=tmp_path)


def test_load_idx_rejects_an_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        datasets.load_idx("cifar10", data_dir=tmp_path)
