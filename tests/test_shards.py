"""Shards in one process: every bad input gives its error (file and sample named); the
stream, the device cache and the memory source yield the same batch for the same (seed,
epoch, step), under any world size, so a resumed epoch repeats the same batches."""

from __future__ import annotations

import json
import signal
import shutil

import numpy as np
import pytest
import torch

from shard_fixtures import (clothing1m_shards, flip_byte, key, member_offset, mnist_shards, rewrite_sample,
                            shard_of, undecodable_png)

from jocor_ddp.config import ConfigError, config_from_dict
from jocor_ddp.data import build_data
from jocor_ddp.data.shards import MANIFEST
from jocor_ddp.data.sources import DataError
from jocor_ddp.data.place import sample_uniforms
from jocor_ddp.data.shardset import open_shards
from jocor_ddp.data.stream import stream_loaders
from jocor_ddp.data.workers import DecodePool
from jocor_ddp.dist import DistContext

CPU = DistContext()


def cfg_for(shards, *, dataset="mnist", batch=8, **data):
    d = {"name": dataset, "source": "shards", "shards": str(shards), "num_workers": 0, **data}
    return config_from_dict({"data": d, "train": {"batch_size": batch, "seed": 3},
                             "noise": {"type": "symmetric", "rate": 0.4}})


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    return mnist_shards(tmp_path_factory.mktemp("mnist"))  # 96 train in 8 shards, 30 test in 3


@pytest.fixture
def shards(clean_shards, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(clean_shards, tmp_path / "shards")


def epoch_batches(loader, epoch, start_step=0):
    return [(b.x.clone(), b.y.clone(), b.clean.clone(), b.idx.clone()) for b in loader.epoch(epoch, start_step)]


def same_batches(a, b):
    return len(a) == len(b) and all(all(torch.equal(u, v) for u, v in zip(p, q)) for p, q in zip(a, b))


# --- determinism and resume --------------------------------------------------------

@pytest.mark.parametrize("cache, workers, augment", [("stream", 2, True), ("stream", 0, False),
                                                     ("device", 2, True)])
def test_resume_mid_epoch_yields_the_same_batches(clean_shards, cache, workers, augment):
    cfg = cfg_for(clean_shards, cache=cache, num_workers=workers, augment=augment)
    train = build_data(cfg, CPU).train
    full = epoch_batches(train, 1)
    assert len(full) == train.steps_per_epoch == 12
    for start in (1, 2, 5):  # both lanes' offsets with two workers
        assert same_batches(epoch_batches(train, 1, start), full[start:])
    assert same_batches(epoch_batches(train, 1), full)           # repeatable
    assert not same_batches(epoch_batches(train, 2), full)       # a new epoch reshuffles
    assert sorted(torch.cat([b[3] for b in full]).tolist()) == list(range(96))


def test_two_ranks_slice_the_one_process_batches(clean_shards):
    """The stream's order is one global permutation of (seed, epoch): rank r of 2 takes the
    r-th half of each one-process batch, whatever the shards and workers."""
    def run(seed, rank=0, world=1, workers=2):
        cfg = cfg_for(clean_shards, cache="stream", num_workers=workers)
        cfg.train.seed = seed
        return [b.idx.tolist() for b in build_data(cfg, DistContext(rank=rank, world_size=world)).train.epoch(0)]
    one = run(1)
    assert one == run(1, workers=0) and one != run(2)
    ranks = [run(1, r, 2, workers=5) for r in range(2)]  # more workers than shards per rank: fine
    assert [a + b for a, b in zip(*ranks)] == one
    assert sorted(i for b in one for i in b) == list(range(96))


def test_augmentation_is_a_function_of_the_sample(clean_shards):
    u1 = sample_uniforms(1, 4, [5, 6, 7])
    assert np.array_equal(u1, sample_uniforms(1, 4, np.array([5, 6, 7])))
    assert np.array_equal(u1[1], sample_uniforms(1, 4, [6])[0])
    assert not np.array_equal(u1, sample_uniforms(1, 5, [5, 6, 7]))
    assert ((u1 >= 0) & (u1 < 1)).all()


def test_device_cache_equals_memory_source(clean_shards):
    raw = clean_shards.parent / "raw"
    base = {"train": {"batch_size": 16, "seed": 5}, "noise": {"type": "pairflip", "rate": 0.3}}
    memory = build_data(config_from_dict({**base, "data": {"name": "mnist", "root": str(raw), "augment": True,
                                                            "train_subset": 80}}), CPU)
    shards = build_data(config_from_dict({**base, "data": {"name": "mnist", "source": "shards", "augment": True,
                                                            "shards": str(clean_shards), "cache": "device",
                                                            "train_subset": 80}}), CPU)
    assert shards.extra["cache"] == "device"
    assert same_batches(epoch_batches(memory.train, 2), epoch_batches(shards.train, 2))
    assert memory.noise.to_dict() == shards.noise.to_dict()
    for a, b in zip(memory.test, shards.test):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert memory.test.num_samples == shards.test.num_samples == 30


def test_instance_noise_is_the_same_labels_from_every_source_and_world_size(clean_shards):
    """Instance noise needs every training image: the memory source's arrays, the shards
    decoded once before training (the device cache and the stream, any workers), under one
    rank or two: the same labels, the same noise.json, the same batches."""
    raw = clean_shards.parent / "raw"
    base = {"train": {"batch_size": 16, "seed": 5}, "noise": {"type": "instance", "rate": 0.4},
            "data": {"name": "mnist", "train_subset": 80, "noisy_val_fraction": 0.1}}
    def trained_labels(train):  # (sample indices trained on, their noisy labels)
        idx = train.sample_idx_np if train.resident else train.usable
        noisy = train.noisy.cpu().numpy()
        return idx, noisy if train.resident else noisy[idx]

    memory = build_data(config_from_dict({**base, "data": {**base["data"], "root": str(raw)}}), CPU)
    idx, labels = trained_labels(memory.train)
    assert len(idx) == 72 and (labels != memory.train.clean.numpy()).any()
    assert 0.3 < memory.noise.actual_rate < 0.5 and memory.noise.transition is None
    for cache, workers, rank, world in (("device", 0, 0, 1), ("stream", 2, 0, 1), ("stream", 0, 1, 2),
                                        ("device", 2, 1, 2)):
        shards = {**base["data"], "source": "shards", "shards": str(clean_shards), "cache": cache,
                  "num_workers": workers}
        bundle = build_data(config_from_dict({**base, "data": shards}), DistContext(rank=rank, world_size=world))
        assert bundle.noise.to_dict() == memory.noise.to_dict(), (cache, workers, world)
        got_idx, got = trained_labels(bundle.train)
        assert np.array_equal(got_idx, idx) and np.array_equal(got, labels), (cache, workers, world)
        if world == 1 and cache == "device":
            assert same_batches(epoch_batches(memory.train, 1), epoch_batches(bundle.train, 1))


def test_instance_noise_and_an_image_that_does_not_decode(clean_shards, shards):
    """The training images are decoded before any label is drawn: a bad one stops the run
    there (the file and sample named), or, skipped, leaves every other sample's label as it was."""
    def labels(folder, **data):
        cfg = cfg_for(folder, num_workers=2, **data)
        cfg.noise.type = "instance"
        return open_shards(cfg, CPU).noisy
    before = labels(clean_shards)
    path = rewrite_sample(shards, "train", 40, image=undecodable_png())
    with pytest.raises(DataError, match=rf"{path} sample {key(40)}: the image does not decode"):
        labels(shards)
    after = labels(shards, on_bad_sample="skip")
    assert np.array_equal(np.delete(after, 40), np.delete(before, 40))


def test_instance_noise_needs_images_of_one_size(tmp_path):
    from jocor_ddp.prepare import prepare
    from shard_fixtures import make_imagefolder
    make_imagefolder(tmp_path / "raw", per_class={"train": 2, "test": 1})
    prepare("imagefolder", str(tmp_path / "raw"), str(tmp_path / "folder"), shard_size=4)
    cfg = cfg_for(tmp_path / "folder", dataset="imagefolder", resize_size=36, crop_size=32)
    cfg.noise.type = "instance"
    with pytest.raises(ConfigError, match=r"^noise.type: instance needs images of one fixed size \(MNIST, CIFAR\); "
                                          r"imagefolder's images vary in size$"):
        open_shards(cfg, CPU)
    c1m, _ = clothing1m_shards(tmp_path / "c1m", n_train=4, n_val=1, n_test=1, shard_size=4)
    cfg = cfg_for(c1m, dataset="clothing1m", resize_size=36, crop_size=32)
    cfg.noise.type = "instance"
    with pytest.raises(ConfigError, match=r"^noise.type: clothing1m's labels are already noisy"):
        open_shards(cfg, CPU)


def stream_and_cache(cfg_base: dict, epoch: int = 1):
    got = {}
    for cache in ("device", "stream"):
        bundle = build_data(config_from_dict({**cfg_base, "data": {**cfg_base["data"], "cache": cache}}), CPU)
        test = list(bundle.test)  # batches of another size: compared whole
        got[cache] = (epoch_batches(bundle.train, epoch), (torch.cat([b.x for b in test]), torch.cat([b.y for b in test])),
                      bundle.test.num_samples - bundle.test.left_out)
    return got["device"], got["stream"]


@pytest.mark.parametrize("augment", [False, True])
def test_stream_equals_the_device_cache_batch_for_batch(clean_shards, augment):
    """The same (seed, epoch, step): the same samples, pixels, labels and crops."""
    base = {"data": {"name": "mnist", "source": "shards", "shards": str(clean_shards), "num_workers": 2,
                     "augment": augment}, "train": {"batch_size": 8, "seed": 3},
            "noise": {"type": "symmetric", "rate": 0.4}}
    device, stream = stream_and_cache(base)
    assert same_batches(device[0], stream[0]) and len(device[0]) == 12
    assert device[2] == stream[2] == 30
    assert torch.equal(device[1][0], stream[1][0]) and torch.equal(device[1][1], stream[1][1])


@pytest.mark.parametrize("resize", [None, 40])
def test_clothing1m_stream_equals_the_device_cache_from_original_and_resized_shards(tmp_path, resize):
    """Resized to 36 then cropped to 32 at random: pixel for pixel the same whether the
    shards hold the original JPEGs or ones prepare re-encoded at a short side of 40."""
    from jocor_ddp.prepare import prepare
    from shard_fixtures import make_clothing1m
    make_clothing1m(tmp_path / "raw", n_train=24)
    prepare("clothing1m", str(tmp_path / "raw"), str(tmp_path / "shards"), shard_size=5, resize=resize)
    base = {"data": {"name": "clothing1m", "source": "shards", "shards": str(tmp_path / "shards"),
                     "num_workers": 2, "resize_size": 36, "crop_size": 32},
            "train": {"batch_size": 8, "seed": 3}, "noise": {"type": "none", "rate": 0.0},
            "method": {"forget_rate": 0.2}}
    device, stream = stream_and_cache(base, epoch=2)
    assert same_batches(device[0], stream[0]) and len(device[0]) == 3
    assert torch.equal(device[1][0], stream[1][0]) and torch.equal(device[1][1], stream[1][1])
    assert device[0][0][0].shape == (8, 3, 32, 32)


def test_decoding_in_a_worker_equals_decoding_in_the_main_process(tmp_path):
    shards, _ = clothing1m_shards(tmp_path, n_train=16, shard_size=4)
    cfg = cfg_for(shards, dataset="clothing1m", resize_size=36, crop_size=32)
    cfg.noise.type, cfg.noise.rate, cfg.method.forget_rate = "none", 0.0, 0.2
    data = open_shards(cfg, CPU)
    got = []
    for workers in (0, 2):
        pool = DecodePool({"train": data.train}, data.geo, batch=8, workers=workers, seed=3, skip_bad=False,
                          device=torch.device("cpu"))
        from jocor_ddp.data.workers import Job
        views = []
        for r in pool.run(Job("train", p, epoch=1) for p in (np.arange(8), np.arange(8, 16))):
            views.append((pool.ring.pixels[r.slot, :8].clone(), pool.ring.params[r.slot, :8].clone(), r.idx))
            pool.release(r)
        pool.close()
        got.append(views)
    for (x0, p0, i0), (x2, p2, i2) in zip(*got):
        assert torch.equal(x0, x2) and torch.equal(p0, p2) and np.array_equal(i0, i2)


@pytest.mark.parametrize("cache", ["device", "stream"])
def test_train_eval_scores_every_training_sample_once(clean_shards, cache):
    """The unaugmented pass over the training split: each sample once, noisy and clean labels."""
    from jocor_ddp.data.sources import load_arrays
    clean = torch.from_numpy(load_arrays("mnist", str(clean_shards.parent / "raw")).train.labels)
    cfg = cfg_for(clean_shards, cache=cache, num_workers=2, augment=True, train_subset=90)
    bundle = build_data(cfg, CPU)
    noisy = torch.from_numpy(open_shards(cfg, CPU).noisy)
    assert (noisy != clean[:90]).any()
    batches = list(bundle.train_eval)
    idx = torch.cat([b.idx for b in batches])
    assert sorted(idx.tolist()) == list(range(90))
    for b in batches:
        assert torch.equal(b.y, noisy[b.idx]) and torch.equal(b.clean, clean[b.idx])
    assert bundle.normalization is None  # the small sets are fed as ToTensor leaves them


def test_auto_cache_follows_the_memory_budget(clean_shards):
    assert build_data(cfg_for(clean_shards), CPU).extra["cache"] == "device"
    tiny = cfg_for(clean_shards, cache_budget_gb=1e-6)
    assert build_data(tiny, CPU).extra["cache"] == "stream"


def test_decoding_workers_ignore_sigterm_and_persist_across_epochs(clean_shards):
    import os
    train = build(clean_shards, cache="stream", num_workers=2).train
    first = epoch_batches(train, 0)
    pids = [p.pid for p in train.pool.procs]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # the main process checkpoints on SIGTERM; workers carry on
    assert same_batches(epoch_batches(train, 0), first)
    assert [p.pid for p in train.pool.procs] == pids and all(p.is_alive() for p in train.pool.procs)


def gpu_route(cfg, data):
    """The GPU-decoding route (packed JPEG bytes from the workers, one batched decode_jpeg in
    a feeder thread), run with the CPU decoder: the only part that needs CUDA is the device."""
    cfg.data.gpu_decode = True  # set after validation, which asks for a CUDA device
    pool = DecodePool({"train": data.train, "test": data.evals["test"].index}, data.geo, batch=8, workers=2,
                      seed=cfg.train.seed, skip_bad=cfg.data.on_bad_sample == "skip", device=CPU.device, raw=True)
    return stream_loaders(cfg, CPU, data, pool)


def test_a_dropped_stream_takes_its_workers_with_it(clean_shards):
    """Nothing keeps a pool alive but its loaders: dropped unclosed, its workers end (a
    process building many bundles, the test suite, leaks none)."""
    import gc
    train = build(clean_shards, cache="stream", num_workers=2).train
    procs = list(train.pool.procs)
    assert len(procs) == 2 and all(p.is_alive() for p in procs)
    del train
    gc.collect()
    assert not any(p.is_alive() for p in procs)


def test_gpu_decode_route_matches_worker_decoding(tmp_path):
    """The same batches as decoding in the workers; a bad JPEG is replaced and counted."""
    shards, _ = clothing1m_shards(tmp_path, n_train=24, shard_size=4)
    cfg = cfg_for(shards, dataset="clothing1m", cache="stream", num_workers=2, resize_size=36, crop_size=32)
    cfg.noise.type, cfg.noise.rate = "none", 0.0
    cfg.method.forget_rate = 0.2  # the labels are the noisy ones: tau must be given
    plain = build_data(cfg, CPU)
    raw_train, raw_evals, *_ = gpu_route(cfg, open_shards(cfg, CPU))
    assert same_batches(epoch_batches(raw_train, 0), epoch_batches(plain.train, 0))
    assert all(torch.equal(a.x, b.x) for a, b in zip(raw_evals["test"], plain.test))
    rewrite_sample(shards, "train", 5, image=b"\xff\xd8\xff\xe0" + bytes(300))
    cfg.data.on_bad_sample = "skip"
    train = gpu_route(cfg, open_shards(cfg, CPU)).train
    batches = list(train.epoch(0))
    assert train.bad.local() == 1 and all(b.x.shape[0] == 8 for b in batches)
    assert 5 not in torch.cat([b.idx for b in batches]).tolist()
    cfg.data.on_bad_sample = "error"
    train = gpu_route(cfg, open_shards(cfg, CPU)).train
    with pytest.raises(DataError, match=rf"train-00000\d.tar sample {key(5)}: the image does not decode"):
        list(train.epoch(0))


# --- bad input ----------------------------------------------------------------------

def build(shards, **data):
    return build_data(cfg_for(shards, **data), CPU)


def test_missing_manifest_and_wrong_dataset(shards, tmp_path):
    with pytest.raises(DataError, match="manifest.json: not found"):
        build(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds 'mnist' shards, data.name is 'cifar10'"):
        build(shards, name="cifar10")
    (shards / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not a valid shard manifest"):
        build(shards)


def test_truncated_tar(shards):
    _, path = shard_of(shards, "train", 30)
    path.write_bytes(path.read_bytes()[:9000])
    with pytest.raises(DataError) as err:
        build(shards)
    assert str(path) in str(err.value) and "sample 000000" in str(err.value)
    assert "truncated" in str(err.value) or "not a readable tar" in str(err.value)


def test_corrupt_tar_header(shards):
    _, path = shard_of(shards, "train", 30)
    offset = member_offset(path, f"{key(26)}.png") - 512  # the member's header block
    data = bytearray(path.read_bytes())
    data[offset:offset + 100] = b"\x07" * 100
    path.write_bytes(bytes(data))
    # tarfile reads a bad header as the end of the archive: the damaged sample is cut short.
    with pytest.raises(DataError, match=rf"{path}: .*sample {key(26)}: its image is not where the index says "
                                        rf"\(a corrupt or truncated tar\?\)"):
        build(shards)


def test_missing_shard(shards):
    _, path = shard_of(shards, "test", 20)
    path.unlink()
    with pytest.raises(DataError, match=rf"{path}: missing \(shard 1 of split 'test', 12 samples"):
        build(shards)


def test_sha256_mismatch_names_the_sample(shards):
    _, path = shard_of(shards, "train", 50)
    flip_byte(path, member_offset(path, f"{key(50)}.png") + 40)
    with pytest.raises(DataError, match=rf"{path}: sha256 .* differs .* sample {key(50)}: the image bytes differ"):
        build(shards)
    # With data.verify=size the stream still checks each sample's crc32 as it reads it.
    with pytest.raises(DataError, match=rf"sample {key(50)}: the \d+ image bytes at offset \d+ differ"):
        train = build(shards, verify="size", cache="stream").train
        list(train.epoch(0))


def test_a_shard_gone_after_verification_is_named_not_a_dead_worker(shards):
    train = build(shards, cache="stream", num_workers=2).train
    _, path = shard_of(shards, "train", 30)
    path.unlink()
    with pytest.raises(DataError, match=rf"{path}: cannot read sample 000000\d\d: .*No such file"):
        list(train.epoch(0))
    assert all(p.is_alive() for p in train.pool.procs)


def test_label_outside_range(shards):
    path = rewrite_sample(shards, "train", 17, cls=10)
    with pytest.raises(DataError, match=rf"{path} sample {key(17)}: label 10 .* outside \[0, 10\)"):
        build(shards)
    for cache in ("device", "stream"):
        bundle = build(shards, on_bad_sample="skip", cache=cache)
        assert bundle.train.index_range == 96  # the range of idx, the left-out sample included
        assert bundle.train.steps_per_epoch == 11  # floor(95 usable / 8)
        idx = torch.cat([b.idx for b in bundle.train.epoch(0)]).tolist()
        assert 17 not in idx and len(idx) == 88 and max(idx) < 96
        assert bundle.train.bad.local() == 1


@pytest.mark.parametrize("cache", ["device", "stream"])
def test_image_that_does_not_decode(shards, cache):
    path = rewrite_sample(shards, "train", 40, image=undecodable_png())
    pattern = rf"{path} sample {key(40)}: the image does not decode"
    with pytest.raises(DataError, match=pattern):  # device: at build; stream: while streaming
        list(build(shards, cache=cache, num_workers=2).train.epoch(0))
    bundle = build(shards, cache=cache, num_workers=2, on_bad_sample="skip")
    idx = torch.cat([b.idx for b in bundle.train.epoch(0)]).tolist()
    assert 40 not in idx and bundle.train.bad.local() == 1


def test_bad_test_image_is_skipped_and_not_expected(shards):
    rewrite_sample(shards, "test", 4, image=undecodable_png())
    bundle = build(shards, cache="stream", num_workers=2, on_bad_sample="skip")
    assert bundle.test.num_samples == 30 and bundle.test.left_out == 0
    scored = sum(b.y.shape[0] for b in bundle.test)  # a pass reports what it left out
    assert bundle.test.left_out == 1 and scored == bundle.test.num_samples - bundle.test.left_out == 29
    with pytest.raises(DataError, match=rf"sample {key(4)}: the image does not decode"):
        list(build(shards, cache="stream").test)


def test_empty_split(shards):
    d = json.loads((shards / MANIFEST).read_text())
    d["splits"]["test"].update(samples=0, shards=[])
    (shards / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(DataError, match="split 'test' is empty"):
        build(shards)


def test_too_few_samples_for_a_global_batch(clean_shards):
    with pytest.raises(DataError, match="fewer than one global batch of 128"):
        build_data(cfg_for(clean_shards, cache="stream", batch=128), CPU)


@pytest.mark.parametrize("key_value, pattern", [
    ("data.cache=disk", "data.cache"), ("data.num_workers=-1", "data.num_workers"),
    ("data.on_bad_sample=ignore", "data.on_bad_sample"), ("data.cache_budget_gb=0", "data.cache_budget_gb"),
    ("data.verify=md5", "data.verify"),
    ("data.eval_splits=[test, test]", "data.eval_splits"), ("data.crop_size=300", "data.crop_size"),
    ("data.resize_size=0", "data.resize_size"), ("data.gpu_decode=maybe", "data.gpu_decode"),
])
def test_config_keys_are_validated(key_value, pattern):
    from jocor_ddp.config import load_config
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["data.source=shards", "data.shards=/x", key_value])


def test_shards_resized_below_data_resize_size_are_refused(tmp_path):
    from jocor_ddp.prepare import prepare
    from shard_fixtures import make_clothing1m
    make_clothing1m(tmp_path / "raw", n_train=8)
    prepare("clothing1m", str(tmp_path / "raw"), str(tmp_path / "shards"), shard_size=4, resize=32)
    cfg = cfg_for(tmp_path / "shards", dataset="clothing1m", resize_size=36, crop_size=32)
    cfg.noise.type, cfg.noise.rate, cfg.method.forget_rate = "none", 0.0, 0.2
    with pytest.raises(DataError, match=rf"{tmp_path / 'shards'}: the shards were prepared with --resize 32, "
                                        rf"smaller than data.resize_size 36"):
        open_shards(cfg, CPU)
    cfg.data.resize_size = 32  # at the stored size: nothing to resize
    assert open_shards(cfg, CPU).geo.prepared_resize == 32


def test_gpu_decode_needs_cuda(clean_shards):
    with pytest.raises(ConfigError, match="data.gpu_decode: needs a CUDA"):
        build(clean_shards, gpu_decode=True)


def test_noisy_label_shards_estimate_the_forget_rate(tmp_path):
    """Clothing1M's labels are the noisy ones: tau cannot default to noise.rate (0), so it is
    estimated (method.forget_rate: auto) unless set. Eight samples are too few to estimate
    from: the error proves auto was chosen, and names the key."""
    from jocor_ddp.trainer import Trainer
    shards, _ = clothing1m_shards(tmp_path, n_train=8, shard_size=4)
    cfg = cfg_for(shards, dataset="clothing1m", cache="stream", num_workers=0, resize_size=36, crop_size=32)
    cfg.noise.type, cfg.noise.rate = "none", 0.0
    cfg.model.arch, cfg.train.batch_size, cfg.run.dir = "mlp", 4, str(tmp_path / "run")
    assert open_shards(cfg, CPU).noise is None
    with pytest.raises(ConfigError, match=r"method.forget_rate: auto needs at least 20 training samples per "
                                          r"class to estimate the noise rate \(280 for 14 classes\); this run "
                                          r"trains on 8"):
        Trainer(cfg, CPU)
    cfg.method.forget_rate = 0.2
    assert Trainer(cfg, CPU).auto is None
