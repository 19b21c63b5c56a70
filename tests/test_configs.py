"""Every file in configs/ loads and validates, and the paper's configs hold the reference
implementation's values for their setting and name the figure they should reproduce."""

import re
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from jocor_ddp.config import load_config
from jocor_ddp.schedule import decide_forget_rate

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# The paper's JoCoR figures (REFERENCE.md) and the reference's per-dataset values.
JOCOR = {
    ("mnist", "sym20"): "98.06", ("mnist", "sym50"): "96.64", ("mnist", "sym80"): "84.89",
    ("mnist", "asym40"): "95.24", ("cifar10", "sym20"): "85.73", ("cifar10", "sym50"): "79.41",
    ("cifar10", "sym80"): "27.78", ("cifar10", "asym40"): "76.36", ("cifar100", "sym20"): "53.01",
    ("cifar100", "sym50"): "43.49", ("cifar100", "sym80"): "15.49", ("cifar100", "asym40"): "32.70",
}
ARCH = {"mnist": "mlp", "cifar10": "cnn", "cifar100": "cnn"}
DECAY_START = {"mnist": 80, "cifar10": 80, "cifar100": 100}
LAMBDA = {("cifar10", "sym20"): 0.9, ("cifar10", "sym50"): 0.9, ("cifar10", "asym40"): 0.9,
          ("cifar10", "sym80"): 0.65, ("mnist", "sym20"): 0.95}
LAMBDA.update({("cifar100", s): 0.85 for s in ("sym20", "sym50", "sym80", "asym40")})


def _setting(path: Path) -> tuple[str, str]:
    dataset, setting = path.stem.rsplit("_", 1)
    return dataset, setting


def _lambda_comment(path: Path) -> str:
    line = next(l for l in path.read_text().splitlines() if l.strip().startswith("co_lambda:"))
    return line.partition("#")[2]


def test_configs_folder_has_every_setting_of_the_paper():
    names = {p.stem for p in CONFIGS}
    expected = {f"{d}_{s}" for d, s in JOCOR} | {"clothing1m"}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    assert any(n.startswith("fashion_mnist_") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    cfg = load_config(str(path))
    # No key of the file is silently dropped: the resolved config holds every value.
    resolved = cfg.to_dict()
    for section, values in yaml.safe_load(path.read_text()).items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert resolved[section][key] == value, f"{section}.{key}"
        else:
            assert resolved[section] == values, section
    # The global batch splits evenly over one 8-GPU node (and over 1, 2 and 4 GPUs).
    cfg.check_world_size(8)
    assert cfg.run.dir == f"runs/{path.stem}", "run.dir: name it after the file"


@pytest.mark.parametrize("key", sorted(JOCOR), ids="_".join)
def test_paper_config_holds_the_reference_values(key):
    dataset, setting = key
    path = REPO / "configs" / f"{dataset}_{setting}.yaml"
    cfg = load_config(str(path))
    rate = int(re.sub(r"\D", "", setting)) / 100
    assert cfg.data.name == dataset
    assert cfg.noise.type == ("asymmetric" if setting.startswith("asym") else "symmetric")
    assert cfg.noise.rate == rate and cfg.noise.seed == 0
    assert decide_forget_rate(cfg.method, cfg.noise, False).tau == pytest.approx(rate / 2 if setting.startswith("asym") else rate)
    assert cfg.model.arch == ARCH[dataset]
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (200, 128, 0.001)
    assert cfg.train.epoch_decay_start == DECAY_START[dataset]
    assert (cfg.method.num_gradual, cfg.method.exponent) == (10, 1.0)
    assert not cfg.data.augment, "the reference uses no augmentation"
    if key in LAMBDA:
        assert cfg.method.co_lambda == LAMBDA[key]
        assert "chosen default" not in _lambda_comment(path)
    else:
        assert "chosen default" in _lambda_comment(path), "say that this lambda is not the paper's"
    header = path.read_text().split("\nrun:")[0]
    assert f"JoCoR {JOCOR[key]}%" in header, "the header names the paper's figure to reproduce"


def _says_where_values_come_from(text: str, keys) -> None:
    for line in text.splitlines():
        key = line.strip().partition(":")[0]
        if key in keys:
            assert "chosen default" in line or "DivideMix" in line, f"{key}: say where the value comes from"


def test_clothing1m_config():
    """The paper's ResNet-18 setup: from scratch, batch 64, clean val and test scored, tau auto."""
    path = REPO / "configs" / "clothing1m.yaml"
    cfg = load_config(str(path))
    assert (cfg.data.name, cfg.data.source, cfg.data.shards) == ("clothing1m", "shards", "/data/shards/clothing1m")
    assert cfg.data.eval_splits == ["val", "test"]
    assert cfg.noise.type == "none"
    assert decide_forget_rate(cfg.method, cfg.noise, labels_noisy=True).auto
    assert cfg.model.arch == "resnet18" and cfg.model.weights is None and not cfg.model.cifar_stem
    assert cfg.train.batch_size == 64 and cfg.train.steps_per_epoch is None and cfg.train.max_per_class is None
    text = path.read_text()
    assert "14 classes" in text and "70.30" in text and "69.79" in text and "clothing1m_tau.yaml" in text
    _says_where_values_come_from(text, ("co_lambda", "num_gradual", "epochs", "lr", "epoch_decay_start"))


def test_clothing1m_resnet50_config_follows_the_fields_protocol():
    path = REPO / "configs" / "clothing1m_resnet50.yaml"
    cfg = load_config(str(path))
    assert cfg.data.eval_splits == ["val", "test"] and (cfg.data.resize_size, cfg.data.crop_size) == (256, 224)
    assert (cfg.model.arch, cfg.model.weights) == ("resnet50", "IMAGENET1K_V1")
    t = cfg.train
    # DivideMix: 1,000 batches an epoch, at most N/14 of each class for N samples an epoch.
    assert t.steps_per_epoch == 1000 and t.max_per_class * 14 >= t.steps_per_epoch * t.batch_size
    assert (t.max_per_class - 1) * 14 < t.steps_per_epoch * t.batch_size
    text = path.read_text()
    assert "74.76" in text and "74.81" in text and "resnet50-0676ba61.pth" in text
    _says_where_values_come_from(text, ("co_lambda", "num_gradual", "epochs", "lr", "epoch_decay_start"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith("fashion_mnist_")],
                         ids=lambda p: p.name)
def test_fashion_mnist_demo_configs_read_the_debian_dataset(path):
    cfg = load_config(str(path))
    assert cfg.data.name == "fashion-mnist"
    assert cfg.data.root == "/usr/share/datasets/fashion-mnist"
    assert "No paper figure exists for Fashion-MNIST" in path.read_text()
