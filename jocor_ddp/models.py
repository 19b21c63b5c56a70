"""The networks: the reference's MLP and CIFAR CNN, torchvision ResNets, and the pair.

JoCoR trains two networks on the same batch; ``ModelPair`` holds both in one module so
that a single DDP wrapper all-reduces both networks' gradients in one backward pass, and
each network runs exactly once per step (two forward passes of one DDP-wrapped
BatchNorm model before a backward would be a trap).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .config import ConfigError, ModelConfig


class MLP(nn.Module):
    """The reference's MNIST network: 784-256-C with one ReLU."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class CNN(nn.Module):
    """The reference's CIFAR network: six 3x3 convolutions (64-64-128-128-196-16) with
    BatchNorm and ReLU, max-pool after the 2nd, 4th and 6th, then one linear layer
    (256 -> C for 32x32 inputs). No dropout, as in the reference's forward pass."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 32, momentum: float = 0.1):
        super().__init__()
        widths = [64, 64, 128, 128, 196, 16]
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, padding=1), nn.BatchNorm2d(w, momentum=momentum), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2, 2))
            prev = w
        self.features = nn.Sequential(*layers)
        side = image_size // 2 // 2 // 2
        self.linear1 = nn.Linear(widths[-1] * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear1(self.features(x).flatten(1))


def _resnet(arch: str, in_channels: int, num_classes: int, cifar_stem: bool) -> nn.Module:
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net


def load_initial_weights(net: nn.Module, path: str) -> list[str]:
    """Load a local state_dict (safely: weights_only); layers whose shape differs (the
    ImageNet classifier, a CIFAR stem) keep their fresh initialisation. Returns their names."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights: {path} not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.weights: {path} is not a loadable weights file: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"model.weights: no tensor in {path} matches the {type(net).__name__} architecture")
    net.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def torchvision_weights_file(arch: str, name: str) -> Path:
    """The file of torchvision's weights ``name`` (IMAGENET1K_V1, DEFAULT, ...) for ``arch`` in
    torchvision's own cache, where its weights API keeps them. Nothing is downloaded at run
    time: a missing file is an error saying which file, which folder and where to get it."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise ConfigError(f"model.weights: {name!r}: torchvision has no weights for model.arch {arch!r}; "
                          f"name a state_dict file") from None
    names = [w.name for w in enum]
    if name != "DEFAULT" and name not in names:
        raise ConfigError(f"model.weights: {name!r} is neither a file nor a weight name of {arch} "
                          f"({', '.join(names)}, DEFAULT)")
    weights = enum.DEFAULT if name == "DEFAULT" else enum[name]
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        raise ConfigError(f"model.weights: {arch} {weights.name} needs {path.name} in {path.parent} (torchvision's "
                          f"cache, $TORCH_HOME/hub/checkpoints); nothing is downloaded at run time: put the file "
                          f"from {weights.url} there")
    return path


def build_network(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if cfg.arch == "mlp":
        net: nn.Module = MLP(in_channels * image_size * image_size, num_classes)
    elif cfg.arch == "cnn":
        if image_size < 8:
            raise ConfigError(f"model.arch: 'cnn' needs images of at least 8x8, got {image_size}")
        net = CNN(in_channels, num_classes, image_size)
    else:
        net = _resnet(cfg.arch, in_channels, num_classes, cfg.cifar_stem)
    if cfg.weights:
        # A weight name is an upper-case word (IMAGENET1K_V1); anything else is a path.
        by_name = re.fullmatch(r"[A-Z][A-Z0-9_]*", cfg.weights) and not Path(cfg.weights).exists()
        load_initial_weights(net, str(torchvision_weights_file(cfg.arch, cfg.weights)) if by_name else cfg.weights)
    return net


class ModelPair(nn.Module):
    def __init__(self, net1: nn.Module, net2: nn.Module):
        super().__init__()
        self.net1 = net1
        self.net2 = net2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net1(x), self.net2(x)


def build_pair(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
               seed: Optional[int] = None) -> ModelPair:
    """Two independently initialised networks; with a seed, the same two on every rank and
    for every world size (DDP would broadcast rank 0's anyway)."""
    if seed is not None:
        torch.manual_seed(seed)
    return ModelPair(build_network(cfg, in_channels, num_classes, image_size),
                     build_network(cfg, in_channels, num_classes, image_size))
