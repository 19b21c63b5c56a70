"""prepare: every dataset round-trips from its original format through the shards;
re-runs are safe; another dataset's shards are not overwritten without --force; the
index's byte offsets fetch single samples, also from format /1 shards; --resize writes
baseline JPEGs, the same bytes whatever the number of workers."""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from helpers import make_cifar, make_mnist, run_python
from shard_fixtures import (clothing1m_shards, downgrade_to_format_1, key, make_clothing1m, make_imagefolder,
                            mnist_shards, read_records, rewrite_index)

from jocor_ddp.data.shards import (IN_PROGRESS, INDEX_DTYPE, MANIFEST, ShardReader, load_manifest,
                                   sha256_file, tar_image_offsets, verify_split)
from jocor_ddp.data.sources import DataError, load_arrays
from jocor_ddp.prepare import main, prepare


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
    assert m.image == {"format": "png", "channels": c, "height": h, "width": w, "resize": None, "quality": None}
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
    import jocor_ddp.convert.sources as prep
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


# --- byte offsets and the single-sample reader ---------------------------------------

def image_members(path: Path) -> dict[str, tuple[int, bytes]]:
    """Sample key -> (offset_data, bytes) of each image member, as tarfile reads the shard."""
    with tarfile.open(path) as tf:
        return {m.name.split(".")[0]: (m.offset_data, tf.extractfile(m).read())
                for m in tf if m.name.endswith((".png", ".jpg"))}


@pytest.mark.parametrize("dataset", ["clothing1m", "mnist"])
def test_index_offsets_are_the_tar_members_and_the_reader_returns_their_bytes(tmp_path, dataset):
    shards = clothing1m_shards(tmp_path)[0] if dataset == "clothing1m" else mnist_shards(tmp_path)
    split = verify_split(load_manifest(shards), "train")
    assert split.rows.dtype == INDEX_DTYPE
    np.testing.assert_array_equal(split.pos_of_idx[split.rows["idx"]], np.arange(split.samples))
    reader = ShardReader(split)
    for i, path in enumerate(split.paths):
        members = image_members(path)
        assert len(members) == len(split.shard_rows(i))
        for pos in range(split.offsets[i], split.offsets[i + 1]):
            offset, data = members[key(split.rows["idx"][pos])]
            assert split.shard_of(pos) == i and split.rows["offset"][pos] == offset
            assert reader.read(pos) == data
    reader.close()


def _read_all(reader: ShardReader, queue) -> None:
    queue.put([reader.read(pos) for pos in range(reader.split.samples)])


def test_reader_reads_after_fork(tmp_path):
    split = verify_split(load_manifest(mnist_shards(tmp_path)), "train")
    reader = ShardReader(split)
    before = [reader.read(pos) for pos in range(split.samples)]  # the parent's files are open
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_all, args=(reader, queue))
    child.start()
    assert queue.get(timeout=60) == before
    child.join(timeout=60)
    assert child.exitcode == 0
    assert [reader.read(pos) for pos in range(split.samples)] == before  # the child closed only its copies
    reader.close()


def test_format_1_shards_get_their_offsets_from_the_tar_headers(tmp_path, capsys):
    shards, _ = clothing1m_shards(tmp_path)
    new = verify_split(load_manifest(shards), "train")
    downgrade_to_format_1(shards)
    capsys.readouterr()
    m = load_manifest(shards)
    assert m.image["resize"] is None and m.image["quality"] is None
    old = verify_split(m, "train")
    again = verify_split(m, "train")
    for split in (old, again):
        assert split.rows.dtype == INDEX_DTYPE
        np.testing.assert_array_equal(split.rows, new.rows)
    err = capsys.readouterr().err
    assert re.fullmatch(rf"warning: {re.escape(str(shards))}: shards prepared before offsets were recorded; "
                        rf"offsets read from the tar headers \(\d+\.\d s\); re-run prepare to skip this\n", err)
    assert ShardReader(old).read(7) == image_members(old.paths[old.shard_of(7)])[key(7)][1]
    # A sample missing from its tar is named with the shard.
    with pytest.raises(DataError, match=rf"^{re.escape(str(old.paths[0]))} sample {key(7)}: no image member"):
        tar_image_offsets(old.paths[0], old.rows[7:8])


def test_reader_names_the_sample_whose_offset_or_bytes_are_wrong(tmp_path):
    shards = mnist_shards(tmp_path)
    rows = verify_split(load_manifest(shards), "train").rows.copy()
    rows["offset"][17] += 1
    rewrite_index(shards, "train", rows)  # consistent with the manifest: only the read can tell
    split = verify_split(load_manifest(shards), "train")
    reader = ShardReader(split)
    assert reader.read(16) and reader.read(18)
    path, nbytes, offset = split.paths[split.shard_of(17)], rows["nbytes"][17], rows["offset"][17]
    with pytest.raises(DataError) as err:
        reader.read(17)
    assert str(err.value) == (f"{path} sample {key(17)}: the {nbytes} image bytes at offset {offset} differ from "
                              f"those written by prepare (a shard that changed, or an index whose offsets do "
                              f"not match it)")
    # A shard cut short after verification: its last sample's read comes up short.
    last = int(split.offsets[2]) - 1
    os.truncate(split.paths[1], int(rows["offset"][last]) + 3)
    with pytest.raises(DataError, match=rf"^{re.escape(str(split.paths[1]))} sample {key(last)}: the "):
        reader.read(last)
    reader.close()


# --- --resize ----------------------------------------------------------------------

def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("dataset, make", [("clothing1m", make_clothing1m),
                                           ("imagefolder", lambda root: make_imagefolder(root, per_class={"train": 3}))])
def test_resize_writes_baseline_420_jpegs_the_same_for_any_workers(tmp_path, dataset, make):
    raw = tmp_path / "raw"
    make(raw)
    m = prepare(dataset, str(raw), str(tmp_path / "w0"), shard_size=8, resize=32, quality=80)
    check_manifest(m, list(m.splits))
    assert m.image == {"format": "jpg", "channels": 3, "height": None, "width": None, "resize": 32, "quality": 80}
    assert load_manifest(tmp_path / "w0").image == m.image
    for split in m.splits:
        for r in all_records(m, split):
            assert r.ext == "jpg"
            with Image.open(io.BytesIO(r.image)) as im, Image.open(raw / r.src) as src:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert JpegImagePlugin.get_sampling(im) == 2 and "progressive" not in im.info
                short = 0 if src.width <= src.height else 1  # the source's shorter side: 32 now
                assert im.size[short] == 32
                assert abs(im.size[1 - short] - 32 * max(src.size) / min(src.size)) < 1  # the aspect, within rounding
    prepare(dataset, str(raw), str(tmp_path / "w2"), shard_size=8, resize=32, quality=80, workers=2)
    assert shard_bytes(tmp_path / "w2") == shard_bytes(tmp_path / "w0")


def test_cli_resize_options_and_the_small_sets_refusal(tmp_path, capsys):
    make_imagefolder(tmp_path / "raw", per_class={"train": 2})
    assert main(["imagefolder", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "s"), "--resize", "24",
                 "--quality", "70", "--workers", "2", "--progress", "never"]) == 0
    image = load_manifest(tmp_path / "s").image
    assert image["format"] == "jpg" and image["resize"] == 24 and image["quality"] == 70
    capsys.readouterr()
    mnist = make_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    assert main(["mnist", "--src", str(mnist), "--out", str(tmp_path / "m"), "--resize", "32"]) == 2
    assert capsys.readouterr().err == ("error: --resize: only clothing1m and imagefolder are resized; the small "
                                       "sets keep their native size\n")
    assert not (tmp_path / "m").exists()


def test_resize_names_an_image_that_does_not_decode(tmp_path):
    expected = make_clothing1m(tmp_path / "raw")
    bad = tmp_path / "raw" / expected["val"][2][0]
    bad.write_bytes(bad.read_bytes()[:300])  # the header parses, the body is cut short
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: not a readable image: "):
        prepare("clothing1m", str(tmp_path / "raw"), str(tmp_path / "shards"), resize=32, workers=2)
