"""Clothing1M's release, parsed into splits for the shard writer.

The release holds an ``images/`` tree of JPEGs and annotation files (in the release
folder or its ``annotations/``): ``noisy_label_kv.txt`` and ``clean_label_kv.txt`` (lines
``images/0/00/name.jpg LABEL``), the key lists ``noisy_train_key_list.txt``,
``clean_train_key_list.txt``, ``clean_val_key_list.txt``, ``clean_test_key_list.txt``,
and ``category_names_eng.txt`` (14 class names). The splits are
``train``: the noisy training list with its noisy labels, plus the clean label where
``clean_label_kv.txt`` has the key; ``val`` and ``test``: the clean lists, clean labels.
(``clean_train_key_list.txt`` is read for completeness: its keys are the clean labels
that ``train`` samples may carry.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.sources import DataError

NUM_CLASSES = 14
FILES = ("noisy_label_kv.txt", "clean_label_kv.txt", "noisy_train_key_list.txt",
         "clean_train_key_list.txt", "clean_val_key_list.txt", "clean_test_key_list.txt",
         "category_names_eng.txt")
HINT = ("point --src at the Clothing1M release folder (the one holding images/ and the "
        "annotation .txt files)")


@dataclass
class Entry:
    key: str    # images/0/00/name.jpg, relative to the release folder
    label: int  # the label training uses: noisy for train, clean for val/test
    clean: int  # -1 where no clean label is known


@dataclass
class Clothing1M:
    root: Path
    classes: list[str]
    splits: dict[str, list[Entry]]


def _annotation(root: Path, name: str) -> Path:
    for p in (root / name, root / "annotations" / name):
        if p.is_file():
            return p
    raise DataError(f"clothing1m: {name} not found in {root} or {root / 'annotations'}; {HINT}")


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_label_kv(path: Path) -> dict[str, int]:
    labels: dict[str, int] = {}
    for n, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: expected 'images/.../name.jpg LABEL', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < NUM_CLASSES:
            raise DataError(f"{path}:{n}: {parts[0]} has label {label}, outside [0, {NUM_CLASSES})")
        labels[parts[0]] = label
    return labels


def read_key_list(path: Path) -> list[tuple[int, str]]:
    keys = []
    for n, line in _lines(path):
        if len(line.split()) != 1:
            raise DataError(f"{path}:{n}: expected one image key a line, got {line!r}")
        keys.append((n, line))
    return keys


def read_classes(path: Path) -> list[str]:
    names = [line for _, line in _lines(path)]
    if len(names) != NUM_CLASSES:
        raise DataError(f"{path}: {len(names)} class names, Clothing1M has {NUM_CLASSES}")
    return names


def _split(root: Path, list_path: Path, labels: dict[str, int], label_file: Path,
           clean: dict[str, int], given_is_clean: bool) -> list[Entry]:
    entries = []
    for n, key in read_key_list(list_path):
        if key not in labels:
            raise DataError(f"{list_path}:{n}: {key} has no label in {label_file}")
        image = root / key
        if not image.is_file():
            raise DataError(f"{list_path}:{n}: sample {key}: image {image} not found")
        label = labels[key]
        entries.append(Entry(key, label, label if given_is_clean else clean.get(key, -1)))
    return entries


def read_clothing1m(root: str | Path) -> Clothing1M:
    """Parse the annotation files and check that every listed image exists."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"clothing1m: {root} is not a folder; {HINT}")
    paths = {name: _annotation(r, name) for name in FILES}
    noisy = read_label_kv(paths["noisy_label_kv.txt"])
    clean = read_label_kv(paths["clean_label_kv.txt"])
    for n, key in read_key_list(paths["clean_train_key_list.txt"]):
        if key not in clean:
            raise DataError(f"{paths['clean_train_key_list.txt']}:{n}: {key} has no label in "
                            f"{paths['clean_label_kv.txt']}")
    splits = {
        "train": _split(r, paths["noisy_train_key_list.txt"], noisy, paths["noisy_label_kv.txt"], clean, False),
        "val": _split(r, paths["clean_val_key_list.txt"], clean, paths["clean_label_kv.txt"], clean, True),
        "test": _split(r, paths["clean_test_key_list.txt"], clean, paths["clean_label_kv.txt"], clean, True),
    }
    return Clothing1M(r, read_classes(paths["category_names_eng.txt"]), splits)
