"""Every bad config fails fast, with a message naming the key and the allowed values."""

import pytest
import yaml

from helpers import run_python, run_torchrun
from jocor_ddp.config import ConfigError, load_config
from jocor_ddp.schedule import ForgetRate, decide_forget_rate

BAD = [
    (["noise.rate=1.0"], r"noise\.rate: 1\.0 is outside \[0\.0, 1\.0\)"),
    (["noise.rate=-0.1"], r"noise\.rate"),
    (["noise.type=instance", "noise.rate=1.0"], r"noise\.rate: 1\.0 is outside \[0\.0, 1\.0\)"),
    (["noise.type=gaussian"], r"noise\.type: 'gaussian' is not one of 'symmetric', 'pairflip'"),
    (["data.name=imagenet"], r"data\.name: 'imagenet' is not one of 'fashion-mnist', 'mnist'"),
    (["model.arch=vgg16"], r"model\.arch: 'vgg16' is not one of 'mlp', 'cnn', 'resnet18'"),
    (["method.forget_rate=1.0"], r"method\.forget_rate: 1\.0 is outside \[0\.0, 1\.0\)"),
    (["method.co_lambda=1.5"], r"method\.co_lambda"),
    (["selection=random"], r"selection: 'random' is not one of 'global', 'local'"),
    (["train.epochs=0"], r"train\.epochs: must be a positive number"),
    (["train.batch_size=abc"], r"train\.batch_size: expected an integer, got 'abc'"),
    (["train.lr=fast"], r"train\.lr: expected a number"),
    (["train.epoch"], r"expected key=value"),
    (["train.epochz=3"], r"train\.epochz: unknown key; allowed here: epochs, batch_size"),
    (["colambda=0.9"], r"colambda: unknown key; allowed here: run, data"),
    (["noise.type=none", "noise.rate=0.2"], r"noise\.rate: must be 0 when noise\.type is 'none'"),
    (["noise.type=file"], r"noise\.file: must name a label file"),
    (["data.source=shards"], r"data\.shards: must name the shard folder"),
    (["train.on_nonfinite=ignore"], r"train\.on_nonfinite"),
    (["dist.timeout_s=0"], r"dist\.timeout_s"),
    (["method.forget_rate=sometimes"], r"method\.forget_rate: 'sometimes' is not one of 'auto'"),
    (["method.forget_rate=auto", "method.name=standard"],
     r"method\.forget_rate: auto: method\.name=standard selects no small-loss share"),
    (["method.forget_rate=auto", "method.name=decoupling"], r"method\.forget_rate: auto: method\.name=decoupling"),
    (["method.forget_rate_fallback=1.0"], r"method\.forget_rate_fallback: 1\.0 is outside"),
    (["data.noisy_val_fraction=0.6"], r"data\.noisy_val_fraction: 0\.6 is outside \[0\.0, 0\.5\]"),
    (["data.val_fraction=-0.1"], r"data\.noisy_val_fraction: -0\.1 is outside"),  # the earlier name, converted
    (["data.eval_splits=[val, test]"], r"data\.eval_splits: the memory source has only test"),
    (["data.eval_splits=[]"], r"data\.eval_splits: must name at least one split"),
    (["data.eval_splits=test"], r"data\.eval_splits: expected a list"),
    (["data.source=shards", "data.shards=S", "data.eval_splits=[test, val, test]"],
     r"data\.eval_splits: 'test' is named twice"),
    (["data.source=shards", "data.shards=S", "data.eval_splits=[train, test]"],
     r"data\.eval_splits: 'train' is trained on"),
    (["data.source=shards", "data.shards=S", "data.eval_splits=[noisy_val, test]"],
     r"data\.eval_splits: 'noisy_val' names the held-out share"),
    (["data.source=shards", "data.shards=S", "data.eval_splits=[test, a/b]"],
     r"data\.eval_splits: 'a/b' is not a split name"),
    (["data.eval_split=test", "data.eval_splits=[test]"],
     r"data\.eval_split: the earlier name of data\.eval_splits; give only data\.eval_splits"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("train:\n  batchsize: 64\n")
    with pytest.raises(ConfigError, match="train.batchsize: unknown key"):
        load_config(str(bad))
    bad.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(str(bad))


def test_overrides_beat_yaml_and_types_are_read(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"epochs": 7, "lr": 0.01}, "noise": {"rate": 0.2}}))
    cfg = load_config(str(f), ["train.epochs=3", "model.weights=null", "data.augment=true", "train.lr=1"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.noise.rate == 0.2 and cfg.model.weights is None and cfg.data.augment is True


def tau(*overrides, labels_noisy=False):
    cfg = load_config(None, list(overrides))
    return decide_forget_rate(cfg.method, cfg.noise, labels_noisy)


def test_forget_rate_defaults_follow_the_reference():
    assert tau("noise.rate=0.5") == ForgetRate(False, 0.5, "the noise rate, as the reference")
    assert tau("noise.type=asymmetric", "noise.rate=0.4").tau == 0.2
    assert tau("noise.rate=0.4", "method.forget_rate=0.3").tau == 0.3
    # Methods that keep no small-loss share take none.
    assert tau("noise.rate=0.4", "method.name=standard") == ForgetRate(False, 0.0, "standard keeps no small-loss share")


def test_forget_rate_auto_is_asked_for_or_the_default_where_the_noise_rate_is_unknown():
    assert tau("method.forget_rate=auto", "method.forget_rate_fallback=0.3") == \
        ForgetRate(True, 0.3, "method.forget_rate: auto")
    # A label file's noise rate is unknown, and so is that of labels that came noisy (Clothing1M's
    # shards): auto unless a number is given.
    assert tau("noise.type=file", "noise.file=x.npy").auto
    assert tau("noise.type=none", "noise.rate=0", labels_noisy=True).auto
    assert tau("noise.type=none", "noise.rate=0", "method.forget_rate=0.3", labels_noisy=True).tau == 0.3
    assert tau("noise.type=file", "noise.file=x.npy", "method.forget_rate=0.3") == \
        ForgetRate(False, 0.3, "method.forget_rate")
    assert not tau("noise.rate=0.5").auto


def test_cli_reports_config_error_without_traceback():
    proc = run_python(["-m", "jocor_ddp.train", "--config", "configs/fashion_mnist_sym50.yaml",
                       "noise.rate=1.5"], check=False, timeout=60)
    assert proc.returncode == 2
    assert "error: noise.rate: 1.5 is outside [0.0, 1.0)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_batch_not_divisible_by_world_size_fails_on_every_rank(tmp_path):
    proc = run_torchrun(2, ["-m", "jocor_ddp.train", "train.batch_size=127", f"run.dir={tmp_path}"],
                        check=False, timeout=90)
    assert proc.returncode != 0
    message = "train.batch_size: the global batch 127 is not divisible by the world size 2"
    assert proc.stderr.count(message) == 2, proc.stderr


def test_missing_data_says_how_to_get_it(tmp_path):
    proc = run_python(["-m", "jocor_ddp.train", f"data.root={tmp_path}", f"run.dir={tmp_path / 'run'}"],
                      check=False, timeout=60)
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte[.gz] not found" in proc.stderr
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
