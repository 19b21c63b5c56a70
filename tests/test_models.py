"""The networks have the reference's shapes; initial weights load from a local file, or by
torchvision's weight name from its cache, and nothing is ever downloaded."""

import re

import pytest
import torch
import torchvision

from jocor_ddp.config import ConfigError, ModelConfig
from jocor_ddp.models import CNN, MLP, build_network, build_pair


def test_mlp_is_784_256_c():
    net = MLP(784, 10)
    assert [tuple(p.shape) for p in net.parameters()] == [(256, 784), (256,), (10, 256), (10,)]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_reference_cnn_layers():
    net = CNN(3, 10, 32)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 196, 16]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 6
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 3
    assert net.linear1.in_features == 256
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_cifar_stem(arch):
    net = build_network(ModelConfig(arch=arch, cifar_stem=True), 3, 100, 32)
    assert net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_initial_weights_from_local_file(tmp_path):
    source = build_network(ModelConfig(arch="resnet18"), 3, 1000, 224)  # an "ImageNet" model
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    net = build_network(ModelConfig(arch="resnet18", weights=str(tmp_path / "r18.pth")), 3, 14, 224)
    assert torch.equal(net.conv1.weight, source.conv1.weight)
    assert net.fc.out_features == 14  # the 1000-class head keeps its fresh initialisation
    with pytest.raises(ConfigError, match="model.weights: .*missing.pth not found"):
        build_network(ModelConfig(arch="resnet18", weights=str(tmp_path / "missing.pth")), 3, 14, 224)


def test_pair_is_seeded_and_the_two_networks_differ():
    a = build_pair(ModelConfig(arch="mlp"), 1, 10, 28, seed=3)
    b = build_pair(ModelConfig(arch="mlp"), 1, 10, 28, seed=3)
    assert torch.equal(a.net1.fc1.weight, b.net1.fc1.weight)
    assert not torch.equal(a.net1.fc1.weight, a.net2.fc1.weight)


# --- model.weights by torchvision's name, from its cache (nothing is downloaded) ------------------

def _cached_imagenet_resnet18(torch_home):
    """A state_dict in the place and under the name torchvision's weights API caches
    ResNet18_Weights.IMAGENET1K_V1 (stands in for the real file: no network at test time)."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(7)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(state, folder / "resnet18-f37072fd.pth")
    return state


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_weights_by_torchvision_name_come_from_its_cache(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    saved = _cached_imagenet_resnet18(tmp_path)
    net = build_network(ModelConfig(arch="resnet18", weights=name), 3, 14, 224)
    assert torch.equal(net.conv1.weight, saved["conv1.weight"])
    assert torch.equal(net.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert net.fc.weight.shape == (14, 512)  # the ImageNet classifier does not fit 14 classes: fresh


def test_a_weight_name_missing_from_the_cache_says_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(ConfigError, match=rf"model.weights: resnet50 IMAGENET1K_V2 needs resnet50-11ad3fa6.pth in "
                                          rf"{re.escape(str(folder))} \(torchvision's cache.*nothing is downloaded"):
        build_network(ModelConfig(arch="resnet50", weights="IMAGENET1K_V2"), 3, 14, 224)
    with pytest.raises(ConfigError, match=r"model.weights: 'IMAGENET9K' is neither a file nor a weight name of "
                                          r"resnet18 \(IMAGENET1K_V1, DEFAULT\)"):
        build_network(ModelConfig(arch="resnet18", weights="IMAGENET9K"), 3, 14, 224)
    with pytest.raises(ConfigError, match=r"torchvision has no weights for model.arch 'mlp'"):
        build_network(ModelConfig(arch="mlp", weights="DEFAULT"), 1, 10, 28)
