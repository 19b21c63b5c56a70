"""WebDataset shards: the on-disk format, the writer, the manifest and its verification.

A shard folder holds, for every split, ``{split}-{000000..}.tar`` (WebDataset tars: one
sample is ``KEY.png|KEY.jpg``, ``KEY.cls``, ``KEY.idx``, maybe ``KEY.clean.cls`` and
``KEY.src.txt``), ``{split}-index.npy`` (one row a sample, in shard order: idx, cls,
clean, crc32 and size of the image bytes) and ``manifest.json``, which lists every file
with its size and sha256. The index lets every rank know all labels and check every
shard before the first batch, without opening a million tar members; the crc32 of each
image names the exact sample when a shard's bytes changed.

Labels are written as the source gives them. Synthetic noise is never baked in: one set
of shards serves every noise setting, and the noisy labels are drawn at training time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import webdataset as wds

from ..progress import Progress
from .sources import DataError

FORMAT = "jocor_ddp.shards/1"
MANIFEST = "manifest.json"
IN_PROGRESS = ".prepare-in-progress"
INDEX_DTYPE = np.dtype([("idx", "<i8"), ("cls", "<i8"), ("clean", "<i8"), ("crc", "<u4"), ("nbytes", "<i8")])
IMAGE_EXTS = ("png", "jpg")
_OUR_FILES = re.compile(r"^[A-Za-z0-9_.]+-(\d{6}\.tar|index\.npy)(\.tmp)?$")


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
    # format: png | jpg | mixed; channels; height/width: null when they vary per image.
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
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        splits = {name: SplitInfo(s["samples"], [FileInfo(**f) for f in s["shards"]], FileInfo(**s["index"]))
                  for name, s in d["splits"].items()}
        m = Manifest(d["dataset"], list(d["classes"]), d["labels"], dict(d["image"]), splits, root)
        if d["num_classes"] != m.num_classes or m.labels not in ("clean", "noisy"):
            raise ValueError("num_classes or labels do not agree with the class list")
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: not a valid shard manifest: {exc}") from None
    return m


# --- reading one shard ---------------------------------------------------------------

@dataclass
class Record:
    """One raw sample of a shard: the image still encoded."""
    shard: str
    key: str
    idx: int
    cls: int
    clean: int
    ext: str
    image: bytes
    src: Optional[str]

    def where(self) -> str:
        return f"{self.shard} sample {self.key}" + (f" ({self.src})" if self.src else "")


def _int_field(sample: dict, name: str, where: str) -> int:
    try:
        return int(sample[name].decode("ascii").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise DataError(f"{where}: missing or non-integer {name!r} entry") from None


def read_records(path: Path, expected: Optional[np.ndarray] = None) -> Iterator[Record]:
    """The samples of one shard in file order, through webdataset's tar reader.

    With ``expected`` (the shard's index rows) every record is checked against the index,
    so a shard that changed after the up-front verification still fails by name.
    """
    last = "(none: the first sample)"
    pos = 0
    try:
        for s in wds.tariterators.tarfile_samples([{"url": str(path)}]):
            key = s["__key__"]
            where = f"{path} sample {key}"
            exts = [e for e in IMAGE_EXTS if e in s]
            if len(exts) != 1:
                found = sorted(k for k in s if not k.startswith("__"))
                raise DataError(f"{where}: incomplete sample: expected one image entry (.png or .jpg), "
                                f"found {found} (a corrupt or truncated tar?)")
            src = s["src.txt"].decode("utf-8", "replace") if "src.txt" in s else None
            clean = _int_field(s, "clean.cls", where) if "clean.cls" in s else -1
            rec = Record(str(path), key, _int_field(s, "idx", where), _int_field(s, "cls", where), clean,
                         exts[0], s[exts[0]], src)
            if expected is not None:
                _check_against_index(rec, expected, pos)
            last = key
            pos += 1
            yield rec
    except DataError:
        raise
    except Exception as exc:  # tarfile.ReadError, OSError, ...: webdataset appends context to args
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        raise DataError(f"{path}: not a readable tar after sample {last}: {reason}") from None
    if expected is not None and pos != len(expected):
        raise DataError(f"{path}: ends after sample {last}, holding {pos} of the {len(expected)} samples "
                        f"the manifest lists (truncated?)")


def _check_against_index(rec: Record, expected: np.ndarray, pos: int) -> None:
    if pos >= len(expected):
        raise DataError(f"{rec.where()}: the shard holds more samples than the manifest lists ({len(expected)})")
    row = expected[pos]
    if rec.key != sample_key(row["idx"]) or rec.idx != row["idx"]:
        raise DataError(f"{rec.where()}: found at position {pos}, where the index lists sample "
                        f"{sample_key(row['idx'])}")
    if rec.cls != row["cls"] or rec.clean != row["clean"]:
        raise DataError(f"{rec.where()}: label {rec.cls} (clean {rec.clean}) differs from the index's "
                        f"{row['cls']} (clean {row['clean']})")
    if len(rec.image) != row["nbytes"] or zlib.crc32(rec.image) != row["crc"]:
        raise DataError(f"{rec.where()}: the image bytes differ from those written by prepare")


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

    def where(self, pos: int) -> str:
        """'PATH sample KEY' for the row at position ``pos`` (shard order)."""
        shard = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        return f"{self.paths[shard]} sample {sample_key(self.rows[pos]['idx'])}"

    def by_idx(self, column: str) -> np.ndarray:
        out = np.empty(self.samples, dtype=np.int64)
        out[self.rows["idx"]] = self.rows[column]
        return out

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
    if rows.dtype != INDEX_DTYPE or rows.ndim != 1 or rows.shape[0] != info.samples:
        raise DataError(f"{path}: expected {info.samples} index rows of {INDEX_DTYPE}, got {rows.shape} {rows.dtype}")
    return rows


def verify_split(manifest: Manifest, name: str, verify: str = "sha256") -> SplitIndex:
    """Check one split completely (files, sizes, sha256, index, sample counts, idx) or
    raise a DataError naming the file and the sample. Deterministic: every rank reading
    the same folder reaches the same verdict, so none is left waiting in a collective."""
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
    return split


def diagnose_shard(path: Path, expected: np.ndarray) -> str:
    """Name the first sample at which a shard departs from its index."""
    try:
        for _ in read_records(path, expected):
            pass
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ").removeprefix(f"{path} ")
    return "every sample matches the index, but other bytes of the file differ"


# --- writing --------------------------------------------------------------------------

@dataclass
class SampleIn:
    """What a source hands the writer: the encoded image and its labels."""
    image: bytes
    cls: int
    clean: int = -1       # -1: unknown
    src: Optional[str] = None  # where it came from, for error messages


def held_dataset(out: Path) -> Optional[str]:
    """The dataset whose shards the folder holds ('an unknown dataset' for stray tars)."""
    if (out / MANIFEST).is_file():
        try:
            return json.loads((out / MANIFEST).read_text())["dataset"]
        except (ValueError, KeyError, TypeError):
            return "an unreadable manifest's dataset"
    if (out / IN_PROGRESS).is_file():
        return (out / IN_PROGRESS).read_text().strip() or "an unknown dataset"
    if out.is_dir() and any(_OUR_FILES.match(p.name) for p in out.iterdir()):
        return "an unknown dataset"
    return None


class DatasetWriter:
    """Writes every split under temporary names, then renames them into place and writes
    the manifest last: an interrupted run never leaves a manifest that lies, and a
    re-run of the same dataset rewrites the same bytes (fixed mtime)."""

    def __init__(self, out: str | Path, dataset: str, classes: list[str], *, force: bool = False,
                 progress: bool = False):
        self.out = Path(out)
        self.dataset = dataset
        self.classes = list(classes)
        self.progress = progress
        held = held_dataset(self.out)
        if held is not None and held != dataset and not force:
            raise DataError(f"{self.out}: holds shards of {held}, not {dataset!r}; refusing to overwrite "
                            f"them (pass --force, or choose another --out)")
        self.out.mkdir(parents=True, exist_ok=True)
        for p in self.out.iterdir():  # leftovers of an interrupted run
            if _OUR_FILES.match(p.name) and p.name.endswith(".tmp"):
                p.unlink()
        (self.out / IN_PROGRESS).write_text(dataset)
        self.splits: dict[str, SplitInfo] = {}

    def write_split(self, name: str, count: int, samples: Iterable[SampleIn], shard_size: int) -> SplitInfo:
        if count <= 0:
            raise DataError(f"{self.dataset}: split {name!r} is empty; nothing to write")
        rows = np.zeros(count, dtype=INDEX_DTYPE)
        shards: list[FileInfo] = []
        bar = Progress(count, f"{self.dataset} {name}", self.progress)
        writer, n = None, 0
        for n, s in enumerate(samples):
            if n >= count:
                raise DataError(f"{self.dataset} {name}: the source gave more than the {count} samples it announced")
            if n % shard_size == 0:
                if writer is not None:
                    shards.append(self._close(writer, name, len(shards), shard_size))
                writer = wds.TarWriter(str(self._tmp(shard_name(name, len(shards)))), encoder=False, mtime=0)
            writer.write(self._sample(name, n, s))
            rows[n] = (n, s.cls, s.clean, zlib.crc32(s.image), len(s.image))
            bar.update(n + 1)
        bar.close()
        if writer is None or n + 1 != count:
            raise DataError(f"{self.dataset} {name}: the source gave {0 if writer is None else n + 1} "
                            f"of the {count} samples it announced")
        shards.append(self._close(writer, name, len(shards), count - shard_size * len(shards)))
        index_tmp = self._tmp(index_name(name))
        with open(index_tmp, "wb") as f:
            np.save(f, rows, allow_pickle=False)
        index = FileInfo(index_name(name), index_tmp.stat().st_size, sha256_file(index_tmp), count)
        self.splits[name] = SplitInfo(count, shards, index)
        return self.splits[name]

    def _sample(self, split: str, n: int, s: SampleIn) -> dict:
        where = f"{self.dataset} {split} sample {n}" + (f" ({s.src})" if s.src else "")
        ext = image_ext(s.image)
        if ext is None:
            raise DataError(f"{where}: not a PNG or JPEG image")
        c = len(self.classes)
        if not (0 <= s.cls < c and -1 <= s.clean < c):
            raise DataError(f"{where}: label {s.cls} (clean {s.clean}) is outside [0, {c})")
        sample = {"__key__": sample_key(n), ext: s.image, "cls": str(s.cls).encode(), "idx": str(n).encode()}
        if s.clean >= 0:
            sample["clean.cls"] = str(s.clean).encode()
        if s.src:
            sample["src.txt"] = s.src.encode("utf-8")
        return sample

    def _tmp(self, name: str) -> Path:
        return self.out / f"{name}.tmp"

    def _close(self, writer: wds.TarWriter, split: str, i: int, samples: int) -> FileInfo:
        writer.close()
        tmp = self._tmp(shard_name(split, i))
        return FileInfo(shard_name(split, i), tmp.stat().st_size, sha256_file(tmp), samples)

    def finish(self, labels: str, image: dict) -> Manifest:
        manifest = Manifest(self.dataset, self.classes, labels, image, self.splits, self.out)
        keep = {f.file for s in self.splits.values() for f in [*s.shards, s.index]}
        # The old manifest goes first: between here and the new one, the folder has none,
        # so a crash in this window reads as "prepare did not finish", never as a mismatch.
        (self.out / MANIFEST).unlink(missing_ok=True)
        for name in sorted(keep):
            os.replace(self._tmp(name), self.out / name)
        for p in self.out.iterdir():  # shards of an earlier, larger run
            if _OUR_FILES.match(p.name) and p.name not in keep:
                p.unlink()
        tmp = self.out / f"{MANIFEST}.tmp"
        tmp.write_text(manifest.to_json())
        os.replace(tmp, self.out / MANIFEST)
        (self.out / IN_PROGRESS).unlink(missing_ok=True)
        return manifest
