"""Mutation check of the test suite: plant realistic bugs one at a time in a copy of the repository
and run the tests that should catch each; docs/testing.md lists every mutant and its killer.

    .venv/bin/python tools/mutate.py                 # every mutant (about 15 min on 2 cores)
    .venv/bin/python tools/mutate.py --only fold_without_beta,no_rho_ema

A mutant is killed when its tests fail; one that survives is a hole in the suite (exit 1).
Each mutation must match its file exactly once, so a refactor that moves the code breaks the tool
loudly instead of silently testing nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, original, mutant, tests to run, what the bug is)
MUTANTS = {
    "fold_without_beta": (
        "qat_sadam/export/freeze.py",
        "bias = (bias - bn.running_mean) * a + beta",
        "bias = (bias - bn.running_mean) * a",
        "tests/test_export.py",
        "BatchNorm fold drops the shift",
    ),
    "fold_without_mean": (
        "qat_sadam/export/freeze.py",
        "bias = (bias - bn.running_mean) * a + beta",
        "bias = bias * a + beta",
        "tests/test_export.py",
        "BatchNorm fold drops the running mean",
    ),
    "probe_seed_without_step": (
        "qat_sadam/optim/sadam.py",
        'gen.manual_seed(_mix(self.seed, index, group["t"]))',
        "gen.manual_seed(_mix(self.seed, index, 0))",
        "tests/test_sadam.py",
        "S-Adam reuses the same probe directions every step",
    ),
    "no_rho_ema": (
        "qat_sadam/optim/sadam.py",
        'group["rho"] = ema * group["rho"] + (1 - ema) * raw',
        'group["rho"] = raw',
        "tests/test_sadam.py",
        "rho not smoothed",
    ),
    "nan_probe_poisons_rho": (
        "qat_sadam/optim/sadam.py",
        "if not math.isfinite(raw):",
        "if False:",
        "tests/test_sadam.py",
        "a probe's non-finite loss reaches rho",
    ),
    "lsq_gradient_sign": (
        "qat_sadam/quant/fake_quant.py",
        "g = self.lsq_grad_factor(x)",
        "g = -self.lsq_grad_factor(x)",
        "tests/test_quant.py",
        "LSQ scale gradient sign flipped",
    ),
    "oscillation_same_direction": (
        "qat_sadam/train/oscillation.py",
        "osc = (direction * last_dir) == -1",
        "osc = (direction * last_dir) == 1",
        "tests/test_train.py",
        "an oscillation counted on a repeated move instead of a reversal",
    ),
    "integer_reference_no_zero_point": (
        "qat_sadam/export/integer_reference.py",
        "y = torch.round(self.acc.float() * self.channel(multiplier)) + q.zero_point.float()",
        "y = torch.round(self.acc.float() * self.channel(multiplier))",
        "tests/test_export.py",
        "requantization ignores the output zero point",
    ),
    "clip_bound_off_by_one": (
        "qat_sadam/export/qdq.py",
        "value_t=torch.tensor(hi, dtype=torch.uint8)",
        "value_t=torch.tensor(hi - 1, dtype=torch.uint8)",
        "tests/test_export.py tests/test_runtimes.py",
        "the sub-8-bit Clip's upper bound one level low",
    ),
    "resume_without_rng": (
        "qat_sadam/train/trainer.py",
        'torch.set_rng_state(ck["rng_cpu"].cpu())',
        "pass",
        "tests/test_reliability.py",
        "resume does not restore the RNG state",
    ),
    "executorch_zero_point_shift": (
        "qat_sadam/export/runtimes/executorch_xnnpack.py",
        "INT8_SHIFT = 128",
        "INT8_SHIFT = 127",
        "tests/test_runtimes.py",
        "uint8 -> int8 zero point off by one",
    ),
    "accuracy_gate_off": (
        "qat_sadam/export/validate.py",
        "ACCURACY_GAP_MAX = 0.02",
        "ACCURACY_GAP_MAX = 1.0",
        "tests/test_export.py",
        "deployed accuracy never compared with the QAT graph",
    ),
    "fold_without_eps": (
        "qat_sadam/export/freeze.py",
        "bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)",
        "bn.weight.detach() / torch.sqrt(bn.running_var)",
        "tests/test_properties.py",
        "BatchNorm folded without eps (matters where a channel's variance is near zero)",
    ),
    "mse_error_over_the_whole_tensor": (
        "qat_sadam/quant/fake_quant.py",
        "err = (self._quantize(x, scale, zp) - x).pow(2).mean(dim=dims)",
        "err = (self._quantize(x, scale, zp) - x).pow(2).mean()",
        "tests/test_properties.py",
        "every channel gets the clipping factor of the whole tensor",
    ),
    "proposal_least_gain_first": (
        "qat_sadam/workflows/sensitivity.py",
        'key=lambda r: -r["gain"] / (r[size] * (HIGH - low))',
        'key=lambda r: r["gain"] / (r[size] * (HIGH - low))',
        "tests/test_properties.py",
        "the mixed-precision budget spent on the layers that gain least",
    ),
    "validation_split_overlaps_training": (
        "qat_sadam/train/data.py",
        "val, keep = perm[:n_val], perm[n_val:]",
        "val, keep = perm[-n_val:], perm[n_val:]",
        "tests/test_properties.py",
        "the lr is chosen on images the model trains on",
    ),
    "group_index_by_value": (
        "qat_sadam/optim/sadam.py",
        "for index, (group, on) in enumerate(zip(self.param_groups, probing)):",
        "for group, on in zip(self.param_groups, probing):\n                index = self.param_groups.index(group)",
        "tests/test_sadam.py",
        "param groups found by equality (crashes on equal-shaped groups)",
    ),
    # -- grown to every module a user relies on (issue 52) -----------------------------------------
    "integer_reference_requant_floors": (
        "qat_sadam/export/integer_reference.py",
        "y = torch.round(self.acc.float() * self.channel(multiplier)) + q.zero_point.float()",
        "y = torch.floor(self.acc.float() * self.channel(multiplier)) + q.zero_point.float()",
        "tests/test_export.py -k every_conv_and_linear",
        "the integer reference requantizes by flooring instead of rounding",
    ),
    "integer_reference_relu_dropped": (
        "qat_sadam/export/integer_reference.py",
        "return _Accumulator(self.acc.clamp_min(0), self.scale, self.axis)",
        "return _Accumulator(self.acc, self.scale, self.axis)",
        "tests/test_export.py -k every_conv_and_linear",
        "a ReLU fused into the accumulator is dropped",
    ),
    "integer_codes_truncate": (
        "qat_sadam/quant/fake_quant.py",
        "return torch.div(x, scale).round_().add_(zero_point).clamp_(qmin, qmax).to(torch.int32)",
        "return torch.div(x, scale).trunc_().add_(zero_point).clamp_(qmin, qmax).to(torch.int32)",
        "tests/test_properties.py",
        "integer codes truncated instead of rounded (the oscillation tracker's, the integer view's)",
    ),
    "lsq_grad_factor_without_qmax": (
        "qat_sadam/quant/fake_quant.py",
        "return 1.0 / math.sqrt(n * self.spec.qmax)",
        "return 1.0 / math.sqrt(n)",
        "tests/test_quant.py",
        "LSQ's gradient scale without Qp",
    ),
    "asymmetric_zero_point_sign": (
        "qat_sadam/quant/fake_quant.py",
        "zp = (s.qmin - torch.round(lo / scale.clamp_min(s.scale_floor))).clamp(s.qmin, s.qmax).int()",
        "zp = (s.qmin + torch.round(lo / scale.clamp_min(s.scale_floor))).clamp(s.qmin, s.qmax).int()",
        "tests/test_quant.py tests/test_properties.py",
        "an asymmetric range's zero point with the wrong sign",
    ),
    "observer_momentum_ignored": (
        "qat_sadam/quant/fake_quant.py",
        "scale = torch.lerp(self.scale, scale.reshape(self.scale.shape), m)",
        "scale = scale.reshape(self.scale.shape)",
        "tests/test_properties.py",
        "an observer's activation scale jumps to each batch's range (momentum ignored)",
    ),
    "adam_without_second_bias_correction": (
        "qat_sadam/optim/functional.py",
        "bias_correction2_sqrt = (1 - beta2**step) ** 0.5",
        "bias_correction2_sqrt = 1.0",
        "tests/test_sadam.py",
        "Adam's second-moment bias correction left out",
    ),
    "decay_ignores_lr": (
        "qat_sadam/optim/functional.py",
        "param.mul_(1 - lr * weight_decay)",
        "param.mul_(1 - weight_decay)",
        "tests/test_sadam.py",
        "decoupled weight decay not scaled by the lr",
    ),
    "damping_grows_with_rho": (
        "qat_sadam/optim/sadam.py",
        'group["damping"] = math.exp(-group["lam"] * group["rho"])',
        'group["damping"] = math.exp(group["lam"] * group["rho"])',
        "tests/test_sadam.py",
        "S-Adam's step grows with instability instead of shrinking",
    ),
    "cosine_without_floor": (
        "qat_sadam/train/trainer.py",
        "min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(",
        "(1 - min_ratio) * 0.5 * (1 + math.cos(",
        "tests/test_properties.py",
        "the cosine schedule ignores its floor (min_lr_ratio)",
    ),
    "warmup_off_by_one": (
        "qat_sadam/train/trainer.py",
        "w = min(1.0, (step + 1) / warmup) if warmup else 1.0",
        "w = min(1.0, step / warmup) if warmup else 1.0",
        "tests/test_properties.py",
        "warm-up's first step at lr 0",
    ),
    "annealing_upside_down": (
        "qat_sadam/train/oscillation_fixes.py",
        "return final + 0.5 * (start - final) * (1 + math.cos(math.pi * t))",
        "return final + 0.5 * (start - final) * (1 - math.cos(math.pi * t))",
        "tests/test_oscillation_fixes.py",
        "the oscillation fixes' cosine annealing runs backwards",
    ),
    "distill_without_t_squared": (
        "qat_sadam/train/trainer.py",
        'reduction="batchmean", log_target=True) * t * t',
        'reduction="batchmean", log_target=True)',
        "tests/test_finetune.py -k distill",
        "distillation loss not scaled by T^2",
    ),
    "recovery_over_float": (
        "qat_sadam/export/validate.py",
        'out["recovery"] = (q - p) / lost if',
        'out["recovery"] = (q - p) / f if',
        "tests/test_finetune.py -k ladder",
        "recovery divided by the float accuracy instead of what PTQ lost",
    ),
    "gap_standard_error_without_sqrt_n": (
        "qat_sadam/export/validate.py",
        "return float(d.std(ddof=1) / np.sqrt(len(d)))",
        "return float(d.std(ddof=1))",
        "tests/test_export.py -k accuracy",
        "the accuracy gap's standard error not divided by sqrt(n)",
    ),
    "gap_gate_ignores_noise": (
        "qat_sadam/export/validate.py",
        "if gap > ACCURACY_GAP_MAX and (se is None or gap > GAP_SIGMAS * se):",
        "if gap > ACCURACY_GAP_MAX:",
        "tests/test_export.py -k accuracy",
        "the accuracy gate fails a gap that is within the noise",
    ),
    "decisive_includes_exact_ties": (
        "qat_sadam/export/runtimes/__init__.py",
        "/ scale > tie_lsb",
        "/ scale >= tie_lsb",
        "tests/test_properties.py",
        "exact ties counted as decisive samples",
    ),
    "fold_tolerance_loose": (
        "qat_sadam/export/freeze.py",
        "FOLD_TOLERANCE_LSB = 1.0",
        "FOLD_TOLERANCE_LSB = 100.0",
        "tests/test_export.py -k fold",
        "the fold check passes layers 100 LSB off",
    ),
    "transposed_without_flip": (
        "qat_sadam/export/freeze.py",
        "w_conv = w_int.flip(tuple(range(2, w_int.dim())))",
        "w_conv = w_int",
        "tests/test_beyond_classifiers.py",
        "a transposed conv exported without flipping its kernel",
    ),
    "bn_reestimate_with_momentum": (
        "qat_sadam/quant/calibration.py",
        "m.momentum = None  # a cumulative average over the batches",
        "m.momentum = 0.1",
        "tests/test_finetune.py -k batchnorm",
        "BatchNorm re-estimation keeps an exponential momentum instead of averaging its batches",
    ),
    "lock_shared": (
        "qat_sadam/train/run.py",
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
        "tests/test_reliability.py -k writer",
        "a run directory's lock that a second writer can share",
    ),
    "checkpoint_without_optimizer": (
        "qat_sadam/train/trainer.py",
        '"optimizer": self.optimizer.state_dict(),',
        '"optimizer": {"state": {}, "param_groups": self.optimizer.state_dict()["param_groups"]},',
        "tests/test_train.py -k resume",
        "a checkpoint holds a fresh optimizer's state (resume restarts Adam's moments)",
    ),
    "normalise_without_std": (
        "qat_sadam/train/data.py",
        ".float().div_(255).sub_(self.mean).div_(self.std)",
        ".float().div_(255).sub_(self.mean)",
        "tests/test_data.py",
        "inputs centred but not divided by the dataset's std",
    ),
    "mask_not_flipped": (
        "qat_sadam/train/data.py",
        "y = torch.where(mask[:, None, None], y.flip(2), y)",
        "y = torch.where(mask[:, None, None], y, y)",
        "tests/test_beyond_classifiers.py",
        "a segmentation mask left unflipped when its image flips",
    ),
    "proposal_over_budget": (
        "qat_sadam/workflows/sensitivity.py",
        'if r["gain"] > 0 and used + extra <= limit:',
        'if r["gain"] > 0:',
        "tests/test_properties.py",
        "the mixed-precision proposal ignores its size budget",
    ),
    "oscillation_frequency_momentum_swapped": (
        "qat_sadam/train/oscillation.py",
        "freq = freq.mul(1 - momentum).add_(osc, alpha=momentum)",
        "freq = freq.mul(momentum).add_(osc, alpha=1 - momentum)",
        "tests/test_properties.py",
        "the oscillation frequency's EMA weights swapped",
    ),
    "int4_out_of_range_packed": (
        "qat_sadam/export/retype.py",
        "if values.min() < INT4_RANGE[0] or values.max() > INT4_RANGE[1] or zeros.any():",
        "if zeros.any():",
        "tests/test_formats.py",
        "weights outside [-8, 7] stored as INT4 (they wrap)",
    ),
    "resume_accepts_any_change": (
        "qat_sadam/workflows/train_run.py",
        "if not key.startswith(RESUMABLE):",
        "if False:",
        "tests/test_fuzz_files.py -k resume",
        "--resume accepts a change to the model, data or optimizer",
    ),
    "probe_radius_not_scaled": (
        "qat_sadam/optim/groups.py",
        "return self.probe_scale * rms(p)",
        "return rms(p)",
        "tests/test_properties.py",
        "a weight without a quantizer probed at its full RMS",
    ),
    "checkpoint_loads_any_pickle": (
        "qat_sadam/train/checkpoint.py",
        "ckpt = torch.load(path, map_location=map_location, weights_only=True)",
        "ckpt = torch.load(path, map_location=map_location, weights_only=False)",
        "tests/test_properties.py",
        "a checkpoint's pickle may run code",
    ),
    "ranks_disagree_on_activation_ranges": (
        "qat_sadam/quant/fake_quant.py",
        "dist.all_reduce(lo, op=dist.ReduceOp.MIN)",
        "pass",
        "tests/test_distributed.py -k identical",
        "data-parallel ranks keep their own observer ranges",
    ),
}


def _copy_repo(dst: str) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f), follow_symlinks=False)


def run_mutant(name: str, timeout: int, baseline: bool = False) -> dict:
    """Run a mutant's tests on a copy with the mutation (or, with ``baseline``, without it: the tests
    must pass there, or a "kill" would mean nothing)."""
    path, old, new, tests, what = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        _copy_repo(tmp)
        target = os.path.join(tmp, path)
        text = open(target).read()
        if text.count(old) != 1:
            return {
                "mutant": name,
                "status": "stale",
                "detail": f"{path}: the original appears {text.count(old)} times",
            }
        if not baseline:
            with open(target, "w") as f:
                f.write(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": tmp}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests.split()]
        try:
            r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"mutant": name, "status": "timeout", "detail": f"tests ran over {timeout} s"}
    killer = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
    return {
        "mutant": name,
        "status": "killed" if r.returncode else "SURVIVED",
        "what": what,
        "file": path,
        "tests": tests,
        "killed_by": killer[0] if killer else None,
    }


def _row(r: dict) -> str:
    return (
        f"| {r['mutant']} | {r.get('what', '')} | {r.get('file', '')} | {r['status']} | "
        f"{r.get('killed_by') or r.get('detail', '-')} |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated mutant names")
    p.add_argument("--timeout", type=int, default=900)
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(MUTANTS)
    suites = {}
    for n in names:  # one unmutated run per test selection
        suites.setdefault(MUTANTS[n][3], n)
    broken = [
        t
        for t, n in tqdm(suites.items(), desc="baseline")
        if run_mutant(n, a.timeout, baseline=True)["status"] != "SURVIVED"
    ]
    if broken:  # "SURVIVED" on the unmutated copy means the tests pass there, as they must
        print(f"the tests fail without any mutation, fix them first: {', '.join(broken)}")
        return 2
    rows = []
    for n in tqdm(names, desc="mutants"):
        rows.append(run_mutant(n, a.timeout))
        tqdm.write(_row(rows[-1]))  # as each ends: an interrupted run keeps what it measured
    print("| mutant | bug | file | status | killed by |\n|---|---|---|---|---|")
    print("\n".join(_row(r) for r in rows))
    return 0 if all(r["status"] == "killed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
