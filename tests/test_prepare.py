"""prepare: every dataset round-trips from its original format through the shards;
re-runs are safe; another dataset's shards are not overwritten without --force."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_cifar, make_mnist, run_python
from shard_fixtures import make_clothing1m, make_imagefolder

from jocor_ddp.data.shards import (IN_PROGRESS, MANIFEST, load_manifest, read_records, sha256_file,
                                   verify_split)
from jocor_ddp.data.sources import DataError, load_arrays
from jocor_ddp.prepare import prepare


def all_records(m, split):
    out = []
    for s in m.splits[split].shards:
        out += list(read_records(m.root / s.file))
    return out


def check_manifest(m, splits):
    assert set(m.splits) == set(splits)
    for name in splits:
        verify_split(m, name)  # sizes, sha256, index, every idx once
        for s in m.splits[name].shards:
            assert sha256_file(m.root / s.file) == s.sha256


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_small_sets_round_trip_pixel_exact(tmp_path, name):
    if name in ("mnist", "fashion-mnist"):
        raw = make_mnist(tmp_path / "raw", n_train=50, n_test=20, gz=name == "mnist")
    else:
        raw = make_cifar(tmp_path / "raw", classes=10 if name == "cifar10" else 100, n_train_per_batch=8, n_test=15)
    source = load_arrays(name, str(raw))
    m = prepare(name, str(raw), str(tmp_path / "shards"), shard_size=7)
    check_manifest(m, ["train", "test"])
    assert m.dataset == name and m.classes == source.classes and m.labels == "clean"
    _, h, w, c = source.train.images.shape
    assert m.image == {"format": "png", "channels": c, "height": h, "width": w}
    for split_name, split in (("train", source.train), ("test", source.test)):
        info = m.splits[split_name]
        assert info.samples == len(split)
        assert [s.samples for s in info.shards] == [7] * (len(split) // 7) + ([len(split) % 7] if len(split) % 7 else [])
        recs = all_records(m, split_name)
        assert [r.idx for r in recs] == list(range(len(split)))
        assert [r.key for r in recs] == [f"{i:08d}" for i in range(len(split))]
        for r in recs:
            assert r.ext == "png"
            pixels = np.asarray(Image.open(io.BytesIO(r.image)))
            np.testing.assert_array_equal(pixels.reshape(h, w, c), split.images[r.idx])
            assert r.cls == r.clean == split.labels[r.idx]


def test_clothing1m_round_trip_keeps_jpeg_bytes(tmp_path):
    expected = make_clothing1m(tmp_path / "raw")
    m = prepare("clothing1m", str(tmp_path / "raw"), str(tmp_path / "shards"), shard_size=8)
    check_manifest(m, ["train", "val", "test"])
    assert m.labels == "noisy" and m.num_classes == 14 and m.image["format"] == "jpg"
    for split, rows in expected.items():
        recs = all_records(m, split)
        assert [(r.src, r.cls, r.clean) for r in recs] == rows
        for r in recs:
            assert r.ext == "jpg"
            assert r.image == (tmp_path / "raw" / r.src).read_bytes()  # never re-encoded


def test_imagefolder_round_trip(tmp_path):
    expected = make_imagefolder(tmp_path / "raw", per_class={"train": 4, "val": 2})
    m = prepare("imagefolder", str(tmp_path / "raw"), str(tmp_path / "shards"), shard_size=5)
    check_manifest(m, ["train", "val"])
    assert m.classes == ["bird", "cat", "dog"] and m.labels == "clean" and m.image["format"] == "mixed"
    for split, rows in expected.items():
        recs = all_records(m, split)
        assert [(r.src, r.cls) for r in recs] == rows
        for r in recs:
            assert r.image == (tmp_path / "raw" / r.src).read_bytes()
            assert r.ext == ("png" if r.src.endswith(".png") else "jpg")


def test_imagefolder_rejects_unknown_class_and_missing_train(tmp_path):
    make_imagefolder(tmp_path / "raw")
    (tmp_path / "raw" / "test" / "horse").mkdir()
    with pytest.raises(DataError, match="horse.*not among the training classes"):
        prepare("imagefolder", str(tmp_path / "raw"), str(tmp_path / "shards"))
    (tmp_path / "other" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ folder"):
        prepare("imagefolder", str(tmp_path / "other"), str(tmp_path / "shards2"))


def test_rerun_is_identical_and_removes_stale_shards(tmp_path):
    raw = make_mnist(tmp_path / "raw", n_train=40, n_test=10)
    out = tmp_path / "shards"
    prepare("mnist", str(raw), str(out), shard_size=5)
    assert (out / "train-000007.tar").is_file()
    first = prepare("mnist", str(raw), str(out), shard_size=20)
    second = prepare("mnist", str(raw), str(out), shard_size=20)
    assert first.to_json() == second.to_json()  # same bytes, same sha256 (fixed mtime)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "test-000000.tar", "test-index.npy", "train-000000.tar",
                     "train-000001.tar", "train-index.npy"]


def test_interrupted_rerun_keeps_the_complete_set(tmp_path, monkeypatch):
    raw = make_mnist(tmp_path / "raw", n_train=40, n_test=10)
    out = tmp_path / "shards"
    good = prepare("mnist", str(raw), str(out), shard_size=5)
    import jocor_ddp.prepare as prep
    original = prep._array_samples

    def broken(split):
        for n, s in enumerate(original(split)):
            if n == 12:
                raise KeyboardInterrupt  # the job is killed mid-way
            yield s

    monkeypatch.setattr(prep, "_array_samples", broken)
    with pytest.raises(KeyboardInterrupt):
        prepare("mnist", str(raw), str(out), shard_size=4)
    assert any(p.name.endswith(".tmp") for p in out.iterdir())
    # The complete set is untouched and still verifies.
    assert load_manifest(out).to_json() == good.to_json()
    verify_split(load_manifest(out), "train")
    monkeypatch.setattr(prep, "_array_samples", original)
    prepare("mnist", str(raw), str(out), shard_size=4)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert not (out / IN_PROGRESS).exists()


def test_interrupted_first_run_leaves_no_manifest(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / IN_PROGRESS).write_text("mnist")
    (out / "train-000000.tar.tmp").write_bytes(b"partial")
    with pytest.raises(DataError, match="did not finish"):
        load_manifest(out)
    with pytest.raises(DataError, match="holds shards of mnist"):
        prepare("cifar10", str(make_cifar(tmp_path / "raw")), str(out))


def test_refuses_another_datasets_shards_without_force(tmp_path):
    out = tmp_path / "shards"
    prepare("mnist", str(make_mnist(tmp_path / "mnist", n_train=20, n_test=10)), str(out), shard_size=10)
    cifar = make_cifar(tmp_path / "cifar", n_train_per_batch=4, n_test=6)
    with pytest.raises(DataError, match=r"holds shards of mnist.*--force"):
        prepare("cifar10", str(cifar), str(out))
    assert load_manifest(out).dataset == "mnist"
    m = prepare("cifar10", str(cifar), str(out), shard_size=100, force=True)
    assert m.dataset == "cifar10"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test-000000.tar", "test-index.npy",
                                                     "train-000000.tar", "train-index.npy"]
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "train-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="unknown dataset"):
        prepare("cifar10", str(cifar), str(tmp_path / "stray"))


def test_cli_progress_and_errors(tmp_path):
    raw = make_mnist(tmp_path / "raw", n_train=30, n_test=10)
    proc = run_python(["-m", "jocor_ddp.prepare", "mnist", "--src", str(raw), "--out", str(tmp_path / "s"),
                       "--shard-size", "8", "--progress", "always"])
    assert "train: 30 samples in 4 shards" in proc.stdout
    assert "data.source=shards data.shards=" in proc.stdout
    assert "mnist train [" in proc.stderr and "30/30" in proc.stderr  # the progress bar
    assert (tmp_path / "s" / MANIFEST).is_file()
    bad = run_python(["-m", "jocor_ddp.prepare", "cifar10", "--src", str(tmp_path / "nowhere"), "--out",
                      str(tmp_path / "c")], check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: cifar10:") and "nowhere" in bad.stderr
    clash = run_python(["-m", "jocor_ddp.prepare", "fashion-mnist", "--src", str(raw), "--out",
                        str(tmp_path / "s")], check=False)
    assert clash.returncode == 2 and "--force" in clash.stderr
