"""Clothing1M: the release layout parses into the right splits and labels, bad
annotations are named, and the shards feed the ImageNet-style transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from torchvision.io import ImageReadMode, decode_image

from helpers import run_python
from shard_fixtures import CLOTHING1M_CLASSES, clothing1m_shards, make_clothing1m

from jocor_ddp.config import ConfigError, config_from_dict
from jocor_ddp.data import build_data
from jocor_ddp.convert.clothing1m import read_clothing1m
from jocor_ddp.data.sources import DataError
from jocor_ddp.data.place import IMAGENET_MEAN, IMAGENET_STD
from jocor_ddp.dist import DistContext
from jocor_ddp.prepare import prepare


def shard_cfg(shards, **data):
    return config_from_dict({
        "data": {"name": "clothing1m", "source": "shards", "shards": str(shards), "num_workers": 0, **data},
        "noise": {"type": "none", "rate": 0.0}, "method": {"forget_rate": 0.2},
        "train": {"batch_size": 8}})


def test_release_parses_into_splits_and_labels(tmp_path):
    expected = make_clothing1m(tmp_path, n_train=30, n_val=7, n_test=9, n_clean_train=5)
    release = read_clothing1m(tmp_path)
    assert release.classes == CLOTHING1M_CLASSES
    got = {name: [(e.key, e.label, e.clean) for e in entries] for name, entries in release.splits.items()}
    assert got == expected
    train = got["train"]
    assert sum(clean >= 0 for _, _, clean in train) == 5  # the clean-train keys carry clean labels
    assert all(label == clean for _, label, clean in got["val"] + got["test"])


def test_annotations_may_live_in_annotations_folder(tmp_path):
    expected = make_clothing1m(tmp_path)
    (tmp_path / "annotations").mkdir()
    for p in tmp_path.glob("*.txt"):
        p.rename(tmp_path / "annotations" / p.name)
    assert [(e.key, e.label, e.clean) for e in read_clothing1m(tmp_path).splits["test"]] == expected["test"]


def test_missing_image_names_the_list_line_and_sample(tmp_path):
    expected = make_clothing1m(tmp_path)
    key = expected["val"][3][0]
    (tmp_path / key).unlink()
    with pytest.raises(DataError) as err:
        prepare("clothing1m", str(tmp_path), str(tmp_path / "shards"))
    msg = str(err.value)
    assert "clean_val_key_list.txt:4" in msg and key in msg and "not found" in msg
    assert not (tmp_path / "shards" / "manifest.json").exists()
    proc = run_python(["-m", "jocor_ddp.prepare", "clothing1m", "--src", str(tmp_path), "--out",
                       str(tmp_path / "shards")], timeout=60, check=False)
    assert proc.returncode == 2 and "clean_val_key_list.txt:4" in proc.stderr and key in proc.stderr


@pytest.mark.parametrize("damage, pattern", [
    (lambda r: (r / "noisy_label_kv.txt").write_text((r / "noisy_label_kv.txt").read_text().replace(" ", " 1", 1)),
     r"noisy_label_kv.txt:1: .* outside \[0, 14\)"),
    (lambda r: (r / "clean_label_kv.txt").write_text((r / "clean_label_kv.txt").read_text().split("\n", 1)[1]),
     r"has no label in .*clean_label_kv.txt"),
    (lambda r: (r / "category_names_eng.txt").write_text("a\nb\n"), r"2 class names, Clothing1M has 14"),
    (lambda r: (r / "clean_test_key_list.txt").unlink(), r"clean_test_key_list.txt not found"),
])
def test_bad_annotations_are_named(tmp_path, damage, pattern):
    make_clothing1m(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=pattern):
        read_clothing1m(tmp_path)


def test_given_labels_are_the_noisy_ones(tmp_path):
    shards, expected = clothing1m_shards(tmp_path, n_train=32)
    bundle = build_data(shard_cfg(shards, cache="device", resize_size=36, crop_size=32), DistContext())
    assert bundle.noise is None and bundle.num_classes == 14 and bundle.image_size == 32
    noisy = {i: label for i, (_, label, _) in enumerate(expected["train"])}
    clean = {i: c for i, (_, _, c) in enumerate(expected["train"])}
    seen = 0
    for batch in bundle.train.epoch(0):
        for i, y, c in zip(batch.idx.tolist(), batch.y.tolist(), batch.clean.tolist()):
            assert y == noisy[i] and c == clean[i]
            seen += 1
    assert seen == 32
    assert bundle.test.num_samples == len(expected["test"])
    both = build_data(shard_cfg(shards, cache="device", eval_splits=["val", "test"], resize_size=36, crop_size=32),
                      DistContext())
    assert list(both.evals) == ["val", "test"]
    for split in ("val", "test"):
        assert both.evals[split].num_samples == len(expected[split])
        assert sorted(torch.cat([b.y for b in both.evals[split]]).tolist()) == \
            sorted(label for _, label, _ in expected[split])
    with pytest.raises(ConfigError, match="noise.type: clothing1m's labels are already noisy"):
        cfg = shard_cfg(shards)
        cfg.noise.type, cfg.noise.rate = "symmetric", 0.4
        build_data(cfg, DistContext())
    with pytest.raises(DataError, match="no split 'holdout'"):
        build_data(shard_cfg(shards, eval_splits=["holdout", "test"]), DistContext())


def reference_eval(data: bytes) -> torch.Tensor:
    img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    pipeline = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.ToDtype(torch.float32, scale=True),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return pipeline(img)


def test_imagenet_transforms_at_full_size(tmp_path):
    shards, expected = clothing1m_shards(tmp_path, n_train=16, n_val=4, n_test=6)
    bundle = build_data(shard_cfg(shards, cache="stream"), DistContext())
    assert bundle.image_size == 224 and bundle.in_channels == 3
    assert bundle.normalization == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    # Test: resize 256, centre crop 224, ImageNet normalisation, exactly torchvision's.
    x = torch.cat([b.x for b in bundle.test])
    assert x.shape == (6, 3, 224, 224)
    for i, (key, _, _) in enumerate(expected["test"]):
        ref = reference_eval((tmp_path / "raw" / key).read_bytes())
        torch.testing.assert_close(x[i], ref, atol=1e-5, rtol=0)
    # Train: a random 224 window of the 256-resized image, maybe flipped, normalised.
    batch = next(iter(bundle.train.epoch(0)))
    assert batch.x.shape == (8, 3, 224, 224)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    flips = 0
    for i, idx in enumerate(batch.idx.tolist()):
        data = (tmp_path / "raw" / expected["train"][idx][0]).read_bytes()
        img = T.Resize(256, antialias=True)(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8)))
        ours = torch.round((batch.x[i] * std + mean) * 255).to(torch.uint8)
        found = find_window(img, ours)
        if found is None:
            found = find_window(img, ours.flip(-1))
            flips += 1
        assert found is not None, f"sample {idx}: not a 224 crop of the resized image"
    second = next(iter(bundle.train.epoch(1)))
    assert not torch.equal(second.x, batch.x)  # a new epoch, new order and crops


def find_window(img: torch.Tensor, window: torch.Tensor):
    h, w = img.shape[-2:]
    s = window.shape[-1]
    for top in range(h - s + 1):
        for left in range(w - s + 1):
            if torch.equal(img[:, top, left:left + s], window[:, 0]) and torch.equal(
                    img[:, top:top + s, left:left + s], window):
                return top, left
    return None


def test_device_cache_and_stream_agree_on_evaluation(tmp_path):
    shards, expected = clothing1m_shards(tmp_path, n_train=16, n_val=4, n_test=6)
    views = []
    for cache in ("device", "stream"):
        bundle = build_data(shard_cfg(shards, cache=cache, resize_size=40, crop_size=32, eval_splits=["val", "test"]),
                            DistContext())
        views.append({split: torch.cat([b.x for b in loader]) for split, loader in bundle.evals.items()})
        batch = next(iter(bundle.train.epoch(0)))
        assert batch.x.shape == (8, 3, 32, 32)
        # Normalised: roughly zero-centred, not in [0, 1].
        assert batch.x.min() < 0
    # Every split, in the order asked for, from both sources.
    assert [(s, len(x)) for s, x in views[0].items()] == [(s, len(x)) for s, x in views[1].items()] == \
        [("val", len(expected["val"])), ("test", len(expected["test"]))]
    # The cache keeps the centre 40x40 of the resized image; the stream crops the same
    # centre from the full resized image: the same view, or shifted by one pixel where
    # torchvision's centre rounding differs between the two routes.
    for split in ("val", "test"):
        pairs = list(zip(views[0][split], views[1][split]))
        for a, b in pairs:
            assert any(torch.allclose(shifted(a, dy, dx), shifted(b, -dy, -dx), atol=1e-5)
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        assert sum(torch.allclose(a, b, atol=1e-5) for a, b in pairs) >= 1, split


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The overlap of x with itself moved by (dy, dx): x[dy:, dx:] for positive shifts."""
    h, w = x.shape[-2:]
    return x[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
