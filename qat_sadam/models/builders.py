"""Model builders: torchvision classifiers (with an optional CIFAR stem) and the paper's small CNNs."""

from __future__ import annotations

import importlib
import inspect

import torch
import torchvision
from torch import nn

from ..errors import RecipeError

OWN_MODELS = ("paper_cnn", "small_cnn", "small_unet")
SOURCES = ("torchvision", "timm", "python")
# Builder arguments that make a torchvision model trainable as any other: one output in train mode.
_TORCHVISION_KW = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


class PaperCNN(nn.Module):
    """The paper's QAT network (no BatchNorm): [conv 3x3 (no padding) - ReLU - maxpool 2] per
    width, dropout 0.25, one linear layer. CIFAR-100 uses widths (16, 32), Tiny ImageNet (16, 32, 64)."""

    def __init__(self, num_classes: int, image_size: int, widths=(16, 32), in_channels: int = 3, dropout: float = 0.25):
        super().__init__()
        layers, c, s = [], in_channels, image_size
        for w in widths:
            layers += [nn.Conv2d(c, w, 3), nn.ReLU(), nn.MaxPool2d(2)]
            c, s = w, (s - 2) // 2
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c * s * s, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(torch.flatten(self.features(x), 1)))


class SmallCNN(nn.Module):
    """A small conv-BN-ReLU network with a residual add, for quick runs (digits, tests)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.body(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallUNet(nn.Module):
    """A small U-Net for segmentation (``shapes``): two encoder stages, two transposed-conv decoder
    stages with skip concatenations, per-pixel logits (N, classes, H, W); H and W divisible by 4."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, width: int = 16):
        super().__init__()

        def block(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        def up(cin, cout):
            return nn.Sequential(
                nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.enc1, self.enc2 = block(in_channels, width), block(width, 2 * width, 2)
        self.enc3 = block(2 * width, 4 * width, 2)
        self.up2, self.dec2 = up(4 * width, 2 * width), block(4 * width, 2 * width)
        self.up1, self.dec1 = up(2 * width, width), block(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.up2(self.enc3(e2)), e2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d2), e1], 1)))


CIFAR_STEM_MODELS = ("resnet18", "resnet50", "mobilenet_v2")


def _cifar_stem(name: str, model: nn.Module) -> None:
    """Adapt an ImageNet network to 32x32 inputs: total stride 8 instead of 32, as the CIFAR
    versions of these networks do. ResNets: a 3x3 stride-1 conv1 and no max-pool. MobileNetV2:
    stride 1 in the stem conv and in the first 24-channel block (4x4 final feature map)."""
    if name.startswith("resnet"):
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.features[0][0].stride = (1, 1)
        model.features[2].conv[1][0].stride = (1, 1)


def timm_module():
    """timm, an optional dependency (``pip install 'qat-sadam[timm]'``; ``make venv`` installs it)."""
    try:
        import timm
    except ImportError:
        raise ValueError(
            "model.source 'timm' needs timm: pip install 'qat-sadam[timm]' (make venv installs it)"
        ) from None
    return timm


def python_factory(name: str):
    """The callable ``package.module:factory`` names (``model.source: python``), imported from
    Python's path (an installed package or PYTHONPATH); RecipeError, one line, when it is not one."""
    module_name, sep, attr = name.partition(":")
    if not (sep and module_name and attr):
        raise RecipeError(f"model.source 'python' takes model.name as package.module:factory, got {name!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raises while it loads
        raise RecipeError(
            f"model.name {name!r}: cannot import {module_name} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "is it installed or on PYTHONPATH?"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise RecipeError(f"model.name {name!r}: {module_name} has no callable {attr!r}")
    return factory


def _own_model(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    """The user's model: ``factory(**kwargs)``, with ``num_classes`` when the factory takes that parameter."""
    factory = python_factory(name)
    params = inspect.signature(factory).parameters
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's code: its error, in one line
        raise RecipeError(f"model.name {name!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(model, nn.Module):
        raise RecipeError(f"model.name {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def model_names(source: str) -> dict[str, str]:
    """What a recipe's ``model.name`` can be for ``source``: name -> a one-line description (qat-sadam's
    own nets), or '' (torchvision's classifiers, timm's models; ValueError without timm)."""
    if source == "own":
        own = {"paper_cnn": PaperCNN, "small_cnn": SmallCNN, "small_unet": SmallUNet}
        return {n: own[n].__doc__.split(":")[0].split(".")[0].strip() for n in OWN_MODELS}
    if source == "torchvision":
        return dict.fromkeys(torchvision.models.list_models(module=torchvision.models), "")
    if source == "timm":
        return dict.fromkeys(timm_module().list_models(), "")
    raise ValueError(f"unknown model source {source!r}; choose one of own, torchvision, timm")


def check_model(name: str, source: str = "torchvision") -> None:
    """ValueError naming the problem when ``name`` is not a model of ``source``."""
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "python":
        python_factory(name)
    elif source == "timm":
        if not timm_module().is_model(name):
            raise ValueError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    elif name not in OWN_MODELS and name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown model {name!r}: neither {' nor '.join(OWN_MODELS)} nor a torchvision classifier "
            "(torchvision.models.list_models(); for timm's set model.source: timm)"
        )


def build_model(
    name: str,
    num_classes: int,
    image_size: int = 32,
    in_channels: int = 3,
    cifar_stem: bool = False,
    widths=(16, 32),
    width: int = 16,
    dropout: float = 0.25,
    source: str = "torchvision",
    kwargs: dict | None = None,
) -> nn.Module:
    """Build a model by name, with random weights (``weights.py`` loads trained ones): qat-sadam's own
    small networks, any torchvision classifier (ViTs at ``image_size``), with ``source="timm"`` any
    timm model, with ``source="python"`` the user's ``package.module:factory`` called with ``kwargs``.
    ``cifar_stem`` adapts ResNets and MobileNetV2 to 32x32 inputs (``_cifar_stem``)."""
    check_model(name, source)
    if source == "python":
        return _own_model(name, num_classes, dict(kwargs or {}))
    if source == "timm":
        return timm_module().create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    if name == "paper_cnn":
        return PaperCNN(num_classes, image_size, tuple(widths), in_channels, dropout)
    if name == "small_cnn":
        return SmallCNN(num_classes, in_channels, width)
    if name == "small_unet":
        return SmallUNet(num_classes, in_channels, width)
    kw = dict(_TORCHVISION_KW.get(name, {}), **({"image_size": image_size} if name.startswith("vit_") else {}))
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    if cifar_stem:
        if name not in CIFAR_STEM_MODELS:
            raise ValueError(f"cifar_stem applies to {', '.join(CIFAR_STEM_MODELS)}, not {name}")
        _cifar_stem(name, model)
    return model
