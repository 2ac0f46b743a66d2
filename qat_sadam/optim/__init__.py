"""The optimizers: S-Adam (reference and residual LGI), Prox-SGD, and S-Adam param groups for QAT models."""

from .functional import adamw_update
from .groups import QuantStepRadius, sadam_param_groups
from .prox_sgd import ProxSGD
from .sadam import SAdam, loss_closure

__all__ = ["SAdam", "loss_closure", "ProxSGD", "adamw_update", "sadam_param_groups", "QuantStepRadius"]
