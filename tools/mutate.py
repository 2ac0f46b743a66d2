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
    rows = [run_mutant(n, a.timeout) for n in tqdm(names, desc="mutants")]
    print("| mutant | bug | file | status | killed by |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mutant']} | {r.get('what', '')} | {r.get('file', '')} | {r['status']} | "
            f"{r.get('killed_by') or r.get('detail', '-')} |"
        )
    return 0 if all(r["status"] == "killed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
