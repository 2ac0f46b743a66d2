"""The AdamW update shared by S-Adam's modes, as a functional core (torch.optim style).

With damping 1.0 and ``eps_mode="torch"`` it performs exactly the operations of
torch.optim.AdamW (single-tensor and foreach paths alike), so lam=0 reproduces AdamW bit for bit.
``eps_mode="reference"`` places eps as the published S-Adam code does:
p -= damping * lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps).
"""

from __future__ import annotations

import torch
from torch import Tensor


def adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    damping: float = 1.0,
    eps_mode: str = "torch",
    foreach: bool = False,
) -> None:
    """One AdamW step whose Adam term (not the decay) is scaled by ``damping``."""
    if not params:
        return
    if eps_mode not in ("torch", "reference"):
        raise ValueError(f"eps_mode must be 'torch' or 'reference', got {eps_mode!r}")
    (_foreach_update if foreach else _single_tensor_update)(
        params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, damping, eps_mode
    )


def _bias_corrections(step: float, lr: float, beta1: float, beta2: float, damping: float, eps_mode: str):
    """(step size, divisor of sqrt(v)) for the given step count."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / bias_correction1
    if eps_mode == "reference":
        return step_size * bias_correction2_sqrt * damping, 1.0
    return step_size * damping, bias_correction2_sqrt


def _single_tensor_update(
    params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, damping, eps_mode
):
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size, divisor = _bias_corrections(step_t.item(), lr, beta1, beta2, damping, eps_mode)
        denom = (exp_avg_sq.sqrt() / divisor).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def _foreach_update(
    params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, damping, eps_mode
):
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps), _ in grouped.values():
        if d_steps[0].is_cpu:
            torch._foreach_add_(d_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(d_steps, 1)
        if weight_decay != 0:
            torch._foreach_mul_(d_params, 1 - lr * weight_decay)
        torch._foreach_lerp_(d_exp_avgs, d_grads, 1 - beta1)
        torch._foreach_mul_(d_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(d_exp_avg_sqs, d_grads, d_grads, 1 - beta2)
        sizes, divisors = zip(*(_bias_corrections(s.item(), lr, beta1, beta2, damping, eps_mode) for s in d_steps))
        denom = torch._foreach_sqrt(d_exp_avg_sqs)
        torch._foreach_div_(denom, list(divisors))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(d_params, d_exp_avgs, denom, [s * -1 for s in sizes])
