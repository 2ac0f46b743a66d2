"""S-Adam (Xu et al., ICML 2026): AdamW whose step is damped by exp(-lam * rho).

rho, the Local Geometric Instability, is estimated from directional probes of the loss:

- ``lgi="reference"`` reproduces the published code exactly (docs/studies/sadam.md),
  flaws included: rho = var(d) / mean(d^2) of k one-sided finite differences along unit
  directions drawn from the global generator, every step, in train mode.
- ``lgi="residual"`` (default) measures how far the gradient mispredicts the loss change over
  antithetic probes e_i: rho = sum R_i^2 / (sum P_i^2 + sum M_i^2), with P_i = <g, e_i>,
  M_i = (L(x + e_i) - L(x - e_i)) / 2, R_i = M_i - P_i. Probes reuse the mini-batch and the
  dropout masks of the gradient pass, leave buffers (BatchNorm statistics) untouched, draw
  their directions from a generator seeded by (seed, step), run every ``probe_every`` steps
  and sync with the host once per probe step. rho is smoothed by an EMA between probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ..buffers import restored
from .functional import adamw_update

Radius = float | Callable[[Tensor], "Tensor | float"] | None
_NOT_SAVED = ("probe_radius",)  # callables: supplied again by whoever builds the optimizer
# Options that only one estimator reads, with their defaults; setting one for the other is an error.
MODE_OPTIONS = {
    "residual": {"probe_radius": None, "probe_scale": 0.01, "probe_every": 16, "rho_ema": 0.9},
    "reference": {"sigma": 0.01, "stabilize_eps": 1e-6},
}
_HINTS = {
    "sigma": "the residual estimator's probe size is probe_radius (absolute) or probe_scale (relative to RMS)",
    "probe_radius": "the reference estimator's probe step is sigma",
    "probe_scale": "the reference estimator's probe step is sigma",
    "probe_every": "the reference estimator probes every step",
    "rho_ema": "the reference estimator does not smooth rho",
    "stabilize_eps": "it is a term of the reference estimator's denominator",
}


def loss_closure(optimizer: Optimizer, loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """The closure ``SAdam.step`` needs (and any torch optimizer accepts): zero the grads, compute
    ``loss_fn()``, backward only when grads are enabled (not inside S-Adam's probes), return the loss."""

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


class SAdam(Optimizer):
    """S-Adam. ``step`` needs a closure on probe steps: it zeroes grads, runs forward, calls
    backward only when ``torch.is_grad_enabled()``, and returns the loss.

    Per-group options, both estimators: lr, betas, eps, weight_decay, lam (0 turns damping and
    probes off), k (number of probe directions).
    ``lgi="residual"`` only: probe_radius (absolute: a float, or a callable param -> radius tensor
    broadcastable to the param), probe_scale (radius = probe_scale x the tensor's RMS, used where
    probe_radius is not given), probe_every, rho_ema; ``probe_buffers``: tensors (e.g.
    ``model.buffers()``) restored after the probes.
    ``lgi="reference"`` only: sigma (the absolute probe step, as the paper names it),
    stabilize_eps (its denominator term).
    Setting an option the chosen estimator does not read raises ValueError.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        lgi: str = "residual",
        k: int = 2,
        lam: float = 2.0,
        probe_radius: Radius = None,
        probe_scale: float | None = None,
        probe_every: int | None = None,
        rho_ema: float | None = None,
        sigma: float | None = None,
        stabilize_eps: float | None = None,
        seed: int = 0,
        probe_buffers: Iterable[Tensor] | None = None,
        foreach: bool | None = None,
    ):
        if lgi not in MODE_OPTIONS:
            raise ValueError(f"lgi must be 'residual' or 'reference', got {lgi!r}")
        self.lgi, self.seed, self.foreach = lgi, seed, foreach
        given = dict(
            probe_radius=probe_radius,
            probe_scale=probe_scale,
            probe_every=probe_every,
            rho_ema=rho_ema,
            sigma=sigma,
            stabilize_eps=stabilize_eps,
        )
        self._check_mode({k_: v for k_, v in given.items() if v is not None}, "SAdam")
        if probe_buffers is not None and lgi == "reference":
            raise ValueError(
                "probe_buffers applies to lgi='residual' only: the reference estimator probes in train "
                "mode and leaves buffers as the probes left them, as published"
            )
        mode = {**MODE_OPTIONS[lgi], **{k_: v for k_, v in given.items() if k_ in MODE_OPTIONS[lgi] and v is not None}}
        checks = [
            (lr >= 0, f"Invalid learning rate: {lr}"),
            (eps >= 0, f"Invalid epsilon value: {eps}"),
            (0 <= betas[0] < 1, f"Invalid beta parameter at index 0: {betas[0]}"),
            (0 <= betas[1] < 1, f"Invalid beta parameter at index 1: {betas[1]}"),
            (weight_decay >= 0, f"Invalid weight_decay value: {weight_decay}"),
            (isinstance(k, int) and k >= 1, f"Invalid number of probe directions k: {k}"),
            (lam >= 0, f"Invalid lam (damping strength): {lam}"),
        ]
        if lgi == "residual":
            checks += [
                (mode["probe_scale"] > 0, f"Invalid probe_scale: {probe_scale}"),
                (
                    isinstance(mode["probe_every"], int) and mode["probe_every"] >= 1,
                    f"Invalid probe_every: {probe_every}",
                ),
                (0 <= mode["rho_ema"] < 1, f"Invalid rho_ema: {rho_ema}"),
            ]
        else:
            checks += [
                (mode["sigma"] > 0, f"Invalid sigma: {sigma}"),
                (mode["stabilize_eps"] > 0, f"Invalid stabilize_eps: {stabilize_eps}"),
            ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            k=k,
            lam=lam,
            **mode,
            rho=0.0,
            damping=1.0,
            probes=0,
            t=0,
        )
        super().__init__(params, defaults)
        self.probe_buffers = list(probe_buffers) if probe_buffers is not None else []

    def _check_mode(self, options: dict, where: str) -> None:
        other = "reference" if self.lgi == "residual" else "residual"
        for key in options:
            if key in MODE_OPTIONS[other]:
                raise ValueError(
                    f"{where}: {key} applies to lgi={other!r} only, this optimizer has lgi={self.lgi!r} ({_HINTS[key]})"
                )
        if options.get("probe_radius") is not None and options.get("probe_scale") is not None:
            raise ValueError(
                f"{where}: give probe_radius (absolute) or probe_scale (relative to the tensor's RMS), not both"
            )

    def add_param_group(self, param_group: dict) -> None:
        self._check_mode(param_group, "param group")
        super().add_param_group(param_group)

    # -- logging --------------------------------------------------------------------------
    @property
    def rho(self) -> list[float]:
        """The rho that damped the last step, per param group."""
        return [g["rho"] for g in self.param_groups]

    @property
    def damping(self) -> list[float]:
        return [g["damping"] for g in self.param_groups]

    # -- state ----------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["param_groups"] = [{k: v for k, v in g.items() if k not in _NOT_SAVED} for g in sd["param_groups"]]
        sd["sadam"] = {"lgi": self.lgi, "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("sadam", {"lgi": self.lgi, "seed": self.seed})
        if extra["lgi"] != self.lgi:
            raise ValueError(f"state_dict is from lgi={extra['lgi']!r}, this optimizer has lgi={self.lgi!r}")
        radii = [g.get("probe_radius") for g in self.param_groups]
        super().load_state_dict(state_dict)
        if self.lgi == "residual":
            for g, r in zip(self.param_groups, radii):
                g["probe_radius"] = r
        self.seed = extra["seed"]

    # -- step -----------------------------------------------------------------------------
    def _probing(self, group) -> bool:
        return group["lam"] > 0 and (self.lgi == "reference" or group["t"] % group["probe_every"] == 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        probing = [self._probing(g) for g in self.param_groups]
        loss = None
        if closure is None and any(probing):
            raise RuntimeError(
                "SAdam.step needs a closure on probe steps: pass one that zeroes grads, runs "
                "forward, calls backward when torch.is_grad_enabled(), and returns the loss"
            )
        rng = _RngState() if self.lgi == "residual" and any(probing) else None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(probing):
            self._probe(closure, loss, probing, rng)
        for group in self.param_groups:
            self._update(group)
            group["t"] += 1
        return loss

    @torch.profiler.record_function("sadam.probe")  # a label for profilers
    def _probe(self, closure, loss, probing, rng):
        # Probing closures typically call zero_grad(); park the gradients where it cannot reach them.
        grads = {p: p.grad for g in self.param_groups for p in g["params"]}
        for p in grads:
            p.grad = None
        try:
            for index, (group, on) in enumerate(zip(self.param_groups, probing)):
                if not on:
                    continue
                params = [p for p in group["params"] if grads[p] is not None]
                if not params:
                    continue
                if self.lgi == "reference":
                    rho = _reference_rho(group, params, closure, _global_loss(loss))
                    group["rho"], group["damping"] = rho, math.exp(-group["lam"] * min(rho, 10.0))
                else:
                    with restored(self.probe_buffers):
                        raw = self._residual_rho(index, group, params, [grads[p] for p in params], closure, rng)
                    if not math.isfinite(raw):  # a probe hit a non-finite loss: keep the last estimate
                        continue
                    ema = group["rho_ema"] if group["probes"] > 0 else 0.0
                    group["rho"] = ema * group["rho"] + (1 - ema) * raw
                    group["damping"] = math.exp(-group["lam"] * group["rho"])
                group["probes"] += 1
        finally:
            if rng is not None:
                rng.restore_after()
            for p, g in grads.items():
                p.grad = g

    def _radii(self, group, params) -> list:
        r = group["probe_radius"]
        if r is None:
            return [group["probe_scale"] * rms(p) for p in params]
        return [r(p) for p in params] if callable(r) else [r] * len(params)

    def _residual_rho(self, index, group, params, grads, closure, rng) -> float:
        device = params[0].device
        gen = torch.Generator(device=device)
        gen.manual_seed(_mix(self.seed, index, group["t"]))
        radii = self._radii(group, params)
        backup = [p.detach().clone() for p in params]
        pert = [torch.empty_like(p) for p in params]  # one perturbation buffer, reused for all k
        predicted, losses = [], []
        for _ in range(group["k"]):
            for e, r in zip(pert, radii):
                e.normal_(generator=gen).mul_(r)
            predicted.append(torch.stack([torch.vdot(g.flatten(), e.flatten()) for g, e in zip(grads, pert)]).sum())
            for sign in (1.0, -1.0):
                torch._foreach_add_(params, pert, alpha=sign)
                rng.restore_before()
                losses.append(torch.as_tensor(closure(), device=device).detach().float())
                torch._foreach_copy_(params, backup)
        losses = _mean_over_ranks(torch.stack(losses))
        measured = (losses[0::2] - losses[1::2]) / 2
        predicted = torch.stack(predicted).float()
        resid = measured - predicted
        # A floor, not stabilize_eps: at small radii P^2 + M^2 is far below 1e-6 and an additive eps
        # would swamp it; the ratio must stay scale-free.
        rho = resid.pow(2).sum() / (predicted.pow(2).sum() + measured.pow(2).sum()).clamp_min(1e-30)
        return rho.item()  # the one host sync of a probe step

    def _update(self, group):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SAdam does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        foreach = self.foreach if self.foreach is not None else all(p.is_cuda for p in params)
        beta1, beta2 = group["betas"]
        adamw_update(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            damping=group["damping"],
            eps_mode="reference" if self.lgi == "reference" else "torch",
            foreach=foreach,
        )


def _reference_rho(group, params, closure, loss0: float) -> float:
    """The published estimator, verbatim: k one-sided probes along unit directions (global RNG)."""
    sigma, k = group["sigma"], group["k"]
    d = []
    for _ in range(k):
        units = []
        for p in params:
            u = torch.randn_like(p)
            u = u / (u.norm() + 1e-12)
            p.add_(sigma * u)
            units.append(u)
        d.append((_global_loss(closure()) - loss0) / sigma)
        for p, u in zip(params, units):
            p.sub_(sigma * u)
    if k < 2:
        return 0.0
    mean = sum(d) / k
    var = sum((x - mean) ** 2 for x in d) / (k - 1)
    return var / (sum(x * x for x in d) / k + group["stabilize_eps"])


def rms(p: Tensor) -> Tensor:
    """The root mean square of a tensor, floored at 1e-3 so that a zero tensor still gets probed."""
    return p.detach().pow(2).mean().sqrt().clamp_min(1e-3)


def _mean_over_ranks(t: Tensor) -> Tensor:
    """Under data parallelism each rank's loss is that of its share of the batch: average them."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _global_loss(loss) -> float:
    return float(_mean_over_ranks(torch.as_tensor(loss).detach()))


def _mix(seed: int, group: int, step: int) -> int:
    """A 63-bit generator seed from (seed, group, step), so resumed runs and all ranks agree."""
    return (seed * 1_000_003 + group * 7_919 + step * 2_654_435_761) % (2**63 - 1)


class _RngState:
    """The global RNG state before the gradient pass, so that probes see the same dropout masks."""

    def __init__(self):
        self.before = self._get()
        self.after = None

    @staticmethod
    def _get():
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    @staticmethod
    def _set(state):
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    def restore_before(self):
        if self.after is None:
            self.after = self._get()
        self._set(self.before)

    def restore_after(self):
        if self.after is not None:
            self._set(self.after)
