"""The shard writer: a source's samples -> the tars, the indexes and the manifest of
``jocor_ddp/data/shards.py``'s format, written so that an interrupted run never leaves a
manifest that lies and a re-run writes the same bytes."""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import webdataset as wds

from ..data.shards import (IN_PROGRESS, INDEX_DTYPE, MANIFEST, FileInfo, Manifest, SplitInfo, image_ext,
                           index_name, sample_key, sha256_file, shard_name, tar_image_offsets)
from ..data.sources import DataError
from ..progress import Progress

_OUR_FILES = re.compile(r"^[A-Za-z0-9_.]+-(\d{6}\.tar|index\.npy)(\.tmp)?$")


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
                    shards.append(self._close(writer, name, len(shards), rows, shard_size))
                writer = wds.TarWriter(str(self._tmp(shard_name(name, len(shards)))), encoder=False, mtime=0)
            writer.write(self._sample(name, n, s))
            rows[n] = (n, s.cls, s.clean, zlib.crc32(s.image), len(s.image), -1)  # offset: at _close
            bar.update(n + 1)
        bar.close()
        if writer is None or n + 1 != count:
            raise DataError(f"{self.dataset} {name}: the source gave {0 if writer is None else n + 1} "
                            f"of the {count} samples it announced")
        shards.append(self._close(writer, name, len(shards), rows, shard_size))
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

    def _close(self, writer: wds.TarWriter, split: str, i: int, rows: np.ndarray, shard_size: int) -> FileInfo:
        """Close shard i and record its samples' image offsets in ``rows``, read back from the
        tar just written (local, so cheap): the tar writer does not report where data lands."""
        writer.close()
        tmp = self._tmp(shard_name(split, i))
        shard = rows[i * shard_size:(i + 1) * shard_size]  # a view: fills rows
        shard["offset"] = tar_image_offsets(tmp, shard)
        return FileInfo(shard_name(split, i), tmp.stat().st_size, sha256_file(tmp), len(shard))

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
