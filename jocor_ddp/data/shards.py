"""WebDataset shards: the on-disk format, the manifest, and the reading and verification
side. The writer lives with the prepare command, in ``writer.py`` of the package one layer
above ``data/``: it imports this module, never the reverse.

A shard folder holds, for every split, ``{split}-{000000..}.tar`` (WebDataset tars: one
sample is ``KEY.png|KEY.jpg``, ``KEY.cls``, ``KEY.idx``, maybe ``KEY.clean.cls`` and
``KEY.src.txt``), ``{split}-index.npy`` (one row a sample, in shard order: idx, cls,
clean, crc32, size and byte offset in its shard of the image bytes) and ``manifest.json``,
which lists every file with its size and sha256. The index lets every rank know all
labels and check every shard before the first batch, without opening a million tar
members; the crc32 of each image names the exact sample when a shard's bytes changed;
the offsets let a reader fetch any one sample with a single read, without parsing the tar.
Format /1 shards, written before the offsets were recorded, still load: their offsets
are read from the tar headers at verification.

Labels are written as the source gives them. Synthetic noise is never baked in: one set
of shards serves every noise setting, and the noisy labels are drawn at training time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np

from .sources import DataError, warn

FORMAT = "jocor_ddp.shards/2"
FORMATS = ("jocor_ddp.shards/1", FORMAT)  # /1: an index without the offset column
MANIFEST = "manifest.json"
IN_PROGRESS = ".prepare-in-progress"
INDEX_DTYPE_V1 = np.dtype([("idx", "<i8"), ("cls", "<i8"), ("clean", "<i8"), ("crc", "<u4"), ("nbytes", "<i8")])
INDEX_DTYPE = np.dtype(INDEX_DTYPE_V1.descr + [("offset", "<i8")])
IMAGE_EXTS = ("png", "jpg")


def sample_key(idx: int) -> str:
    return f"{int(idx):08d}"


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def index_name(split: str) -> str:
    return f"{split}-index.npy"


def image_ext(data: bytes) -> Optional[str]:
    """'png' or 'jpg' from the magic bytes; the shards keep the source's encoding."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)  # releases the GIL: several shards hash in parallel threads
    return h.hexdigest()


# --- the manifest --------------------------------------------------------------------

@dataclass
class FileInfo:
    file: str
    bytes: int
    sha256: str
    samples: int = 0


@dataclass
class SplitInfo:
    samples: int
    shards: list[FileInfo]
    index: FileInfo


@dataclass
class Manifest:
    dataset: str
    classes: list[str]
    # 'clean': cls holds clean labels (synthetic noise is drawn at training time);
    # 'noisy': cls holds the given noisy labels and clean.cls the clean ones where known.
    labels: str
    # format: png | jpg | mixed; channels; height/width: null when they vary per image;
    # resize/quality: the shorter side and JPEG quality of re-encoded images, null when
    # the images are the source's own bytes.
    image: dict
    splits: dict[str, SplitInfo]
    root: Path = field(default=Path("."), compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        d = {"format": FORMAT, "dataset": self.dataset, "classes": self.classes,
             "num_classes": self.num_classes, "labels": self.labels, "image": self.image,
             "splits": {k: asdict(v) for k, v in self.splits.items()}}
        return json.dumps(d, indent=1)


def load_manifest(shard_dir: str | Path) -> Manifest:
    root = Path(shard_dir)
    path = root / MANIFEST
    if not path.is_file():
        hint = ("a prepare run into it did not finish; re-run it" if (root / IN_PROGRESS).exists()
                else "write one with `python -m jocor_ddp.prepare DATASET --src RAW --out DIR`")
        raise DataError(f"{path}: not found ({hint})")
    try:
        d = json.loads(path.read_text())
        if d.get("format") not in FORMATS:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        splits = {name: SplitInfo(s["samples"], [FileInfo(**f) for f in s["shards"]], FileInfo(**s["index"]))
                  for name, s in d["splits"].items()}
        image = dict(d["image"])
        for key in ("resize", "quality"):  # absent from manifests written before prepare --resize
            image.setdefault(key, None)
        m = Manifest(d["dataset"], list(d["classes"]), d["labels"], image, splits, root)
        if d["num_classes"] != m.num_classes or m.labels not in ("clean", "noisy"):
            raise ValueError("num_classes or labels do not agree with the class list")
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: not a valid shard manifest: {exc}") from None
    return m


# --- verification: on every rank, before any collective -------------------------------

@dataclass
class SplitIndex:
    """A verified split: its shard paths and the index rows, in shard order."""
    name: str
    paths: list[Path]
    rows: np.ndarray
    offsets: np.ndarray  # rows of shard i: offsets[i]:offsets[i + 1]

    @property
    def samples(self) -> int:
        return int(self.rows.shape[0])

    def shard_rows(self, i: int) -> np.ndarray:
        return self.rows[self.offsets[i]:self.offsets[i + 1]]

    def shard_of(self, pos: int) -> int:
        """The shard holding the row at position ``pos`` (shard order)."""
        return int(np.searchsorted(self.offsets, pos, side="right")) - 1

    def where(self, pos: int) -> str:
        """'PATH sample KEY' for the row at position ``pos`` (shard order)."""
        return f"{self.paths[self.shard_of(pos)]} sample {sample_key(self.rows[pos]['idx'])}"

    @cached_property
    def pos_of_idx(self) -> np.ndarray:
        """Row position of each sample index: the inverse of rows['idx']."""
        out = np.empty(self.samples, dtype=np.int64)
        out[self.rows["idx"]] = np.arange(self.samples)
        return out

    def by_idx(self, column: str) -> np.ndarray:
        return self.rows[column][self.pos_of_idx].astype(np.int64, copy=False)

    def bad_labels(self, num_classes: int) -> np.ndarray:
        """Positions whose label (or known clean label) is outside [0, C)."""
        cls, clean = self.rows["cls"], self.rows["clean"]
        bad = (cls < 0) | (cls >= num_classes) | (clean < -1) | (clean >= num_classes)
        return np.flatnonzero(bad)

    def describe_label(self, pos: int, num_classes: int) -> str:
        row = self.rows[pos]
        return (f"{self.where(pos)}: label {row['cls']} (clean {row['clean']}) is outside [0, {num_classes}); "
                f"set data.on_bad_sample=skip to leave such samples out")


def _load_index(root: Path, name: str, info: SplitInfo) -> np.ndarray:
    path = root / info.index.file
    if not path.is_file():
        raise DataError(f"{path}: missing (the index of split {name!r} listed in {root / MANIFEST})")
    if sha256_file(path) != info.index.sha256:
        raise DataError(f"{path}: sha256 differs from {root / MANIFEST}; re-run prepare")
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable index: {exc}") from None
    if rows.dtype not in (INDEX_DTYPE, INDEX_DTYPE_V1) or rows.ndim != 1 or rows.shape[0] != info.samples:
        raise DataError(f"{path}: expected {info.samples} index rows of {INDEX_DTYPE}, got {rows.shape} {rows.dtype}")
    return rows


def _tar_members(path: Path) -> tuple[dict[str, int], Optional[str]]:
    """Member name -> data offset, from the tar headers alone (tarfile seeks from header to
    header without reading the data), and why the walk stopped early, if it did."""
    members: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:  # a header that does not parse reads as the end of the archive
                members[m.name] = m.offset_data
    except (tarfile.TarError, OSError) as exc:
        return members, str(exc)
    return members, None


def _image_offset(members: dict[str, int], idx: int) -> Optional[int]:
    key = sample_key(idx)
    return next((members[n] for n in (f"{key}.{ext}" for ext in IMAGE_EXTS) if n in members), None)


def tar_image_offsets(path: Path, rows: np.ndarray) -> np.ndarray:
    """The byte offset of each row's image data in the shard at ``path``, from its tar headers."""
    members, error = _tar_members(path)
    if error:
        raise DataError(f"{path}: not a readable tar: {error}")
    out = np.empty(len(rows), dtype=np.int64)
    for j, idx in enumerate(rows["idx"]):
        offset = _image_offset(members, idx)
        if offset is None:
            raise DataError(f"{path} sample {sample_key(idx)}: no image member ({sample_key(idx)}.png or "
                            f"{sample_key(idx)}.jpg) in the tar")
        out[j] = offset
    return out


_warned_legacy: set[tuple[Path, str]] = set()


def _with_offsets(split: SplitIndex, root: Path) -> np.ndarray:
    """A format /1 index's rows (no offset column) with the offsets read from the tars."""
    start = time.perf_counter()
    rows = np.zeros(split.samples, dtype=INDEX_DTYPE)
    rows[list(INDEX_DTYPE_V1.names)] = split.rows
    for i, path in enumerate(split.paths):
        shard = rows[split.offsets[i]:split.offsets[i + 1]]  # a view: fills rows
        shard["offset"] = tar_image_offsets(path, shard)
    if (root, split.name) not in _warned_legacy:
        _warned_legacy.add((root, split.name))
        warn(f"{root}: shards prepared before offsets were recorded; offsets read from the tar headers "
             f"({time.perf_counter() - start:.1f} s); re-run prepare to skip this")
    return rows


def verify_split(manifest: Manifest, name: str, verify: str = "sha256") -> SplitIndex:
    """Check one split completely (files, sizes, sha256, index, sample counts, idx) or
    raise a DataError naming the file and the sample. Deterministic: every rank reading
    the same folder reaches the same verdict, so none is left waiting in a collective.
    The rows always have INDEX_DTYPE: a format /1 index gets its offsets from the tars."""
    root = manifest.root
    if name not in manifest.splits:
        raise DataError(f"{root / MANIFEST}: no split {name!r}; it holds {', '.join(sorted(manifest.splits))}")
    info = manifest.splits[name]
    if info.samples <= 0 or not info.shards:
        raise DataError(f"{root / MANIFEST}: split {name!r} is empty (no samples); re-run prepare on a "
                        f"source that has some")
    paths = [root / s.file for s in info.shards]
    counts = np.array([s.samples for s in info.shards], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if offsets[-1] != info.samples:
        raise DataError(f"{root / MANIFEST}: split {name!r} lists {info.samples} samples, its shards {offsets[-1]}")
    for i, p in enumerate(paths):
        if not p.is_file():
            raise DataError(f"{p}: missing (shard {i} of split {name!r}, {counts[i]} samples, listed in "
                            f"{root / MANIFEST})")
    rows = _load_index(root, name, info)
    split = SplitIndex(name, paths, rows, offsets)
    if not np.array_equal(np.sort(rows["idx"]), np.arange(info.samples)):
        raise DataError(f"{root / index_name(name)}: the sample indices are not 0..{info.samples - 1} once each")
    for i, (p, s) in enumerate(zip(paths, info.shards)):
        size = p.stat().st_size
        if size != s.bytes:
            raise DataError(f"{p}: {size} bytes, the manifest says {s.bytes}: {diagnose_shard(p, split.shard_rows(i))}")
    if verify == "sha256":
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(sha256_file, paths))
        for i, (p, s, digest) in enumerate(zip(paths, info.shards, digests)):
            if digest != s.sha256:
                raise DataError(f"{p}: sha256 {digest[:12]}... differs from the manifest's {s.sha256[:12]}...: "
                                f"{diagnose_shard(p, split.shard_rows(i))}")
    if rows.dtype == INDEX_DTYPE_V1:
        split.rows = _with_offsets(split, root)
    return split


def diagnose_shard(path: Path, rows: np.ndarray) -> str:
    """Name the first sample at which a shard departs from its index: the first whose image
    the tar headers no longer list where the index has it (a corrupt or truncated tar), or
    whose image bytes differ."""
    members, _ = _tar_members(path)  # what parsed before any damage still names the sample after it
    with open(path, "rb") as f:
        for row in rows:
            key, offset = sample_key(row["idx"]), _image_offset(members, row["idx"])
            if offset is None or ("offset" in rows.dtype.names and offset != row["offset"]):
                return f"sample {key}: its image is not where the index says (a corrupt or truncated tar?)"
            f.seek(offset)
            data = f.read(int(row["nbytes"]))
            if len(data) != row["nbytes"] or zlib.crc32(data) != row["crc"]:
                return f"sample {key}: the image bytes differ from those written by prepare"
    return "every sample matches the index, but other bytes of the file differ"


# --- reading one sample by its offset ------------------------------------------------

class ShardReader:
    """Reads single samples' image bytes by (shard path, offset, nbytes) without parsing the tar;
    keeps the shard files open (a persistent worker reads many samples of the same shards)."""

    def __init__(self, split: SplitIndex):
        self.split = split
        self._files: dict[Path, BinaryIO] = {}
        self._pid = os.getpid()

    def read(self, pos: int) -> bytes:
        """The image bytes of the row at position ``pos`` (shard order), checked against its crc32."""
        row = self.split.rows[pos]
        path = self.split.paths[self.split.shard_of(pos)]
        offset, nbytes = int(row["offset"]), int(row["nbytes"])
        try:  # pread: no file position to share with a forked parent or another thread
            data = os.pread(self._file(path).fileno(), nbytes, offset)
        except OSError as exc:  # the shard vanished or its storage failed after verification
            raise DataError(f"{path}: cannot read sample {sample_key(row['idx'])}: {exc}") from None
        if len(data) != nbytes or zlib.crc32(data) != row["crc"]:
            raise DataError(f"{path} sample {sample_key(row['idx'])}: the {nbytes} image bytes at offset {offset} "
                            f"differ from those written by prepare (a shard that changed, or an index whose "
                            f"offsets do not match it)")
        return data

    def _file(self, path: Path) -> BinaryIO:
        if self._pid != os.getpid():  # forked: drop the inherited copies of the parent's files, open ours
            self.close()
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb", buffering=0)
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
