"""An ImageFolder-layout source: ``ROOT/SPLIT/CLASS_NAME/*.jpg|jpeg|png``.

Every subfolder of ROOT is a split (``train`` is required); the classes are the
subfolders of ``train``, sorted, and every other split may use only those. Labels are
taken as clean: synthetic noise is drawn at training time, as for CIFAR.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..data.sources import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]  # split -> (path relative to root, label)


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_imagefolder(root: str | Path) -> ImageFolder:
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"imagefolder: {root} is not a folder (expected ROOT/SPLIT/CLASS/*.jpg)")
    split_dirs = _subfolders(r)
    if "train" not in [d.name for d in split_dirs]:
        raise DataError(f"imagefolder: {r} has no train/ folder (expected ROOT/train/CLASS/*.jpg and "
                        f"e.g. ROOT/test/CLASS/*.jpg)")
    classes = [d.name for d in _subfolders(r / "train")]
    if not classes:
        raise DataError(f"imagefolder: {r / 'train'} has no class folders")
    splits: dict[str, list[tuple[str, int]]] = {}
    for split_dir in split_dirs:
        if not _SPLIT_NAME.match(split_dir.name):
            raise DataError(f"imagefolder: {split_dir}: split names may use letters, digits and '_' only")
        samples = []
        for class_dir in _subfolders(split_dir):
            if class_dir.name not in classes:
                raise DataError(f"imagefolder: {class_dir}: class {class_dir.name!r} is not among the "
                                f"training classes ({', '.join(classes)})")
            label = classes.index(class_dir.name)
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            samples += [(str(p.relative_to(r)), label) for p in files]
        splits[split_dir.name] = samples
    return ImageFolder(r, classes, splits)
