"""Models: builders by name and the loading of trained weights into them."""
from .builders import CIFAR_STEM_MODELS, MODELS, PaperCNN, SmallCNN, build_model
from .weights import load_weights, read_state_dict, torchvision_state_dict, weight_names

__all__ = ["MODELS", "CIFAR_STEM_MODELS", "PaperCNN", "SmallCNN", "build_model", "load_weights", "read_state_dict",
           "torchvision_state_dict", "weight_names"]
