"""Generated datasets in the Clothing1M and ImageFolder layouts, shard folders ready for
training, and the ways tests damage them (a truncated tar, a flipped byte, a sample
rewritten by a "buggy writer" with a consistent manifest)."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import webdataset as wds
from PIL import Image

from helpers import make_cifar, make_mnist

from jocor_ddp.data.shards import (MANIFEST, INDEX_DTYPE, INDEX_DTYPE_V1, load_manifest,
                                   sample_key, sha256_file, tar_image_offsets)
from jocor_ddp.prepare import prepare

CLOTHING1M_CLASSES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
                      "Jacket", "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]


def image_bytes(rng: np.random.Generator, label: int, size: tuple[int, int], fmt: str) -> bytes:
    """A small image whose colour says its class (so a model can learn it), plus noise."""
    h, w = size
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
    pixels = np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_clothing1m(root: Path, *, n_train: int = 40, n_val: int = 10, n_test: int = 12,
                    n_clean_train: int = 6, seed: int = 0) -> dict:
    """The release layout: images/D/DD/NAME.jpg and the seven annotation files.

    Returns the expected splits: split -> list of (key, label, clean label or -1).
    Train samples carry noisy labels (about half wrong); the first n_clean_train of them
    also appear in clean_label_kv.txt; val and test have clean labels only.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    total = n_train + n_val + n_test
    keys, truth = [], rng.integers(0, 14, size=total)
    for i in range(total):
        key = f"images/{i % 10}/{i % 100:02d}/{1000 + i}.jpg"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(24, 48)), int(rng.integers(24, 48)))
        (root / key).write_bytes(image_bytes(rng, int(truth[i]), size, "JPEG"))
        keys.append(key)
    noisy = np.where(rng.random(total) < 0.5, truth, rng.integers(0, 14, size=total))
    train, val, test = keys[:n_train], keys[n_train:n_train + n_val], keys[n_train + n_val:]
    clean_train = train[:n_clean_train]
    # Like the release, the label files hold more keys than the lists use.
    noisy_kv = [f"{k} {noisy[i]}" for i, k in enumerate(keys)]
    clean_kv = [f"{k} {truth[i]}" for i, k in enumerate(keys) if k in clean_train or i >= n_train]
    files = {
        "noisy_label_kv.txt": noisy_kv, "clean_label_kv.txt": clean_kv,
        "noisy_train_key_list.txt": train, "clean_train_key_list.txt": clean_train,
        "clean_val_key_list.txt": val, "clean_test_key_list.txt": test,
        "category_names_eng.txt": CLOTHING1M_CLASSES,
    }
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    pos = {k: i for i, k in enumerate(keys)}
    return {
        "train": [(k, int(noisy[pos[k]]), int(truth[pos[k]]) if k in clean_train else -1) for k in train],
        "val": [(k, int(truth[pos[k]]), int(truth[pos[k]])) for k in val],
        "test": [(k, int(truth[pos[k]]), int(truth[pos[k]])) for k in test],
    }


def make_imagefolder(root: Path, *, classes=("bird", "cat", "dog"), per_class: dict | None = None,
                     seed: int = 0) -> dict:
    """ROOT/SPLIT/CLASS/NAME.jpg|png, mixed formats and sizes. Returns split -> [(rel, label)]
    in the order the reader lists them (sorted class, then sorted file name)."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 6, "test": 3}
    expected: dict = {}
    for split, n in per_class.items():
        expected[split] = []
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext, fmt = (".png", "PNG") if i % 3 == 0 else (".jpg", "JPEG")
                size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
                (folder / f"img{i:03d}{ext}").write_bytes(image_bytes(rng, label, size, fmt))
            expected[split] += [(f"{split}/{name}/img{i:03d}{'.png' if i % 3 == 0 else '.jpg'}", label)
                                for i in range(n)]
        (root / split / classes[0] / "notes.txt").write_text("not an image: ignored")
    return expected


def mnist_shards(tmp: Path, *, n_train: int = 96, n_test: int = 30, shard_size: int = 12,
                 seed: int = 0) -> Path:
    raw = make_mnist(tmp / "raw", n_train=n_train, n_test=n_test, seed=seed)
    prepare("mnist", str(raw), str(tmp / "shards"), shard_size=shard_size)
    return tmp / "shards"


def cifar_shards(tmp: Path, *, per_batch: int = 16, n_test: int = 20, shard_size: int = 10) -> Path:
    make_cifar(tmp / "raw", n_train_per_batch=per_batch, n_test=n_test)
    prepare("cifar10", str(tmp / "raw"), str(tmp / "shards"), shard_size=shard_size)
    return tmp / "shards"


def clothing1m_shards(tmp: Path, *, shard_size: int = 5, **kw) -> tuple[Path, dict]:
    expected = make_clothing1m(tmp / "raw", **kw)
    prepare("clothing1m", str(tmp / "raw"), str(tmp / "shards"), shard_size=shard_size)
    return tmp / "shards", expected


# --- damage -------------------------------------------------------------------------

def shard_of(shard_dir: Path, split: str, idx: int) -> tuple[int, Path]:
    """(shard number, path) of the shard holding sample ``idx``."""
    m = load_manifest(shard_dir)
    start = 0
    for i, s in enumerate(m.splits[split].shards):
        if idx < start + s.samples:
            return i, shard_dir / s.file
        start += s.samples
    raise IndexError(idx)


def member_offset(path: Path, name: str) -> int:
    """Byte offset of a tar member's data (to flip a byte inside one sample's image)."""
    with tarfile.open(path) as tf:
        return tf.getmember(name).offset_data


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_index(shard_dir: Path, split: str, rows: np.ndarray, *, fmt: str | None = None) -> None:
    """Replace a split's index by ``rows``, with the manifest's size and sha256 of it (and
    its format, when given) to match: only the checks of the content itself can catch it."""
    d = json.loads((shard_dir / MANIFEST).read_text())
    entry = d["splits"][split]["index"]
    index_path = shard_dir / entry["file"]
    with open(index_path, "wb") as f:
        np.save(f, rows, allow_pickle=False)
    entry.update(bytes=index_path.stat().st_size, sha256=sha256_file(index_path))
    d["format"] = fmt or d["format"]
    (shard_dir / MANIFEST).write_text(json.dumps(d, indent=1))


def downgrade_to_format_1(shard_dir: Path) -> None:
    """The shards as a format /1 prepare wrote them: indexes without offsets, a manifest
    without the image entry's resize and quality."""
    m = load_manifest(shard_dir)
    for name, info in m.splits.items():
        rows = np.load(shard_dir / info.index.file)
        old = np.zeros(len(rows), dtype=INDEX_DTYPE_V1)
        for column in INDEX_DTYPE_V1.names:
            old[column] = rows[column]
        rewrite_index(shard_dir, name, old, fmt="jocor_ddp.shards/1")
    d = json.loads((shard_dir / MANIFEST).read_text())
    for k in ("resize", "quality"):
        del d["image"][k]
    (shard_dir / MANIFEST).write_text(json.dumps(d, indent=1))


@dataclass
class Record:
    """One sample of a shard as the tar holds it, read independently of the package's reader."""
    key: str
    idx: int
    cls: int
    clean: int
    ext: str
    image: bytes
    src: Optional[str]


def read_records(path: Path) -> list[Record]:
    out = []
    for s in wds.tariterators.tarfile_samples([{"url": str(path)}]):
        ext = "png" if "png" in s else "jpg"
        out.append(Record(s["__key__"], int(s["idx"]), int(s["cls"]), int(s.get("clean.cls", b"-1")), ext, s[ext],
                          s["src.txt"].decode() if "src.txt" in s else None))
    return out


def rewrite_sample(shard_dir: Path, split: str, idx: int, *, cls: int | None = None,
                   image: bytes | None = None) -> Path:
    """Rewrite one sample as a buggy writer would, keeping index and manifest consistent
    (sizes, crc32, offsets, sha256): only the checks of the content itself can catch it."""
    i, path = shard_of(shard_dir, split, idx)
    m = load_manifest(shard_dir)
    rows = np.load(shard_dir / m.splits[split].index.file)
    records = read_records(path)
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for rec in records:
            data, label = rec.image, rec.cls
            if rec.idx == idx:
                data = image if image is not None else data
                label = cls if cls is not None else label
                pos = int(np.flatnonzero(rows["idx"] == idx)[0])
                rows[pos]["cls"] = label
                rows[pos]["crc"] = zlib.crc32(data)
                rows[pos]["nbytes"] = len(data)
            sample = {"__key__": rec.key, rec.ext: data, "cls": str(label).encode(), "idx": str(rec.idx).encode()}
            if rec.clean >= 0:
                sample["clean.cls"] = str(rec.clean if rec.idx != idx or cls is None else label).encode()
                if rec.idx == idx and cls is not None:
                    rows[pos]["clean"] = label
            if rec.src:
                sample["src.txt"] = rec.src.encode()
            w.write(sample)
    assert rows.dtype == INDEX_DTYPE
    in_shard = np.isin(rows["idx"], [rec.idx for rec in records])
    rows["offset"][in_shard] = tar_image_offsets(path, rows[in_shard])  # a new image moves those after it
    d = json.loads((shard_dir / MANIFEST).read_text())
    d["splits"][split]["shards"][i].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (shard_dir / MANIFEST).write_text(json.dumps(d, indent=1))
    rewrite_index(shard_dir, split, rows)
    return path


def undecodable_png() -> bytes:
    """PNG magic and a header, then garbage: passes every check but decoding."""
    return b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + bytes(range(200))


def key(idx: int) -> str:
    return sample_key(idx)
