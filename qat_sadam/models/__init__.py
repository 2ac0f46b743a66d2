"""Models: builders by name and the loading of trained weights into them."""

from .builders import (
    CIFAR_STEM_MODELS,
    OWN_MODELS,
    SOURCES,
    PaperCNN,
    SmallCNN,
    build_model,
    check_model,
    model_names,
    timm_module,
)
from .weights import check_values, load_weights, read_state_dict, timm_state_dict, torchvision_state_dict, weight_names

__all__ = [
    "OWN_MODELS",
    "SOURCES",
    "CIFAR_STEM_MODELS",
    "check_model",
    "model_names",
    "timm_module",
    "PaperCNN",
    "SmallCNN",
    "build_model",
    "check_values",
    "load_weights",
    "read_state_dict",
    "torchvision_state_dict",
    "timm_state_dict",
    "weight_names",
]
