"""The networks have the reference's shapes; initial weights load from a local file only."""

import pytest
import torch

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
