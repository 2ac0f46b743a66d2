"""QAT training cost against float training, and where the time goes (docs/studies/benchmarks.md).

    python tools/benchmarks/bench_training_cost.py --model resnet18 --batch 32 --rounds 4
    python tools/benchmarks/bench_training_cost.py --model mobilenet_v2 --batch 128 --rounds 3 --profile
    python tools/benchmarks/bench_training_cost.py --model mobilenet_v2 --imagenet-stem --batch 128 --rounds 3

Cells, each a model in train mode with its own optimizer, timed in blocks of 8 steps (an S-Adam
cell: one probe period, so every block holds one probe step) interleaved round by round in one
process: float AdamW; QAT AdamW at W8A8 and W4A4
with LSQ scales (W4A4 also with the eager kernels instead of the fused ones: the weight and
activation fake-quant and the oscillation tracker), W4A4 with observer scales; QAT S-Adam at W4A4,
with its defaults (probes every 16 steps) and probing every 8 (the default until stop 37). Four untimed steps per cell
first (the fused
kernels compile on first use). The table gives the median s/step, its spread (min-max over
rounds) and the ratio to the float step measured in the same run, and, timed in the same rotation,
one forward of the W4A4 model without autograd (what S-Adam's probes run) with the floor it sets
for S-Adam's cost: 1 + 2k / probe_every x its share of a step. ``--profile`` adds a
torch.profiler breakdown of one 8-step block of each QAT cell by component: weight fake-quant, activation fake-quant,
oscillation tracking, S-Adam probes, and the
rest (convolutions, BatchNorm, the loss, backward, the optimizer update). ``--components`` times,
interleaved, forward + backward of our per-tensor LSQ fake-quant (LSQPerTensor, eager, and
FusedLSQPerTensor, torch.compile) against torch's _fake_quantize_learnable_per_tensor_affine and
a relu on one (batch, 64, 32, 32) activation, one oscillation-tracker update over the model's
4-bit weights, fused and eager, and forward + backward of every weight's fake-quant
(FusedLSQPerChannel against torch's _fake_quantize_learnable_per_channel_affine).
``--host-memory`` sets the allocator mode the trainer applies (train/host_memory.py; auto: heap on
glibc), once for the whole process, so compare modes by running the tool once per mode; the table
gives each cell's system time and page faults per step (getrusage over its blocks).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm

from qat_sadam import SAdam, calibrate, prepare_qat, sadam_param_groups
from qat_sadam.models import CIFAR_STEM_MODELS, build_model
from qat_sadam.optim import loss_closure
from qat_sadam.optim.groups import quantized_weights
from qat_sadam.quant.fake_quant import FusedLSQPerTensor, LSQPerTensor
from qat_sadam.quant.kernels import use_fused_kernels
from qat_sadam.train.host_memory import MODES as HOST_MEMORY_MODES
from qat_sadam.train.host_memory import set_host_memory
from qat_sadam.train.oscillation import OscillationTracker

QAT, SADAM, SADAM8 = "QAT W4A4 adamw (LSQ)", "QAT W4A4 sadam (defaults)", "QAT W4A4 sadam (probe_every 8)"
PROBE = "one forward without gradients (an S-Adam probe, train mode)"
BLOCK = 8
WARMUP = 4  # untimed steps per cell: the fused kernels compile their shape variants in the first few
CELLS = [
    "float adamw",
    "QAT W8A8 adamw (LSQ)",
    "QAT W4A4 adamw (LSQ)",
    "QAT W4A4 adamw (LSQ, eager kernels)",
    "QAT W4A4 adamw (observer)",
    SADAM,
    SADAM8,
]


def _cell(name: str, model_name: str, x, cifar_stem: bool):
    torch.manual_seed(0)
    model = build_model(model_name, 100, cifar_stem=cifar_stem)
    if name != "float adamw":
        bits = 8 if "W8" in name else 4
        spec = {"bits": bits}
        if "observer" in name:
            spec.update(weight={"scale_mode": "observer"}, activation={"scale_mode": "observer"})
        model = prepare_qat(model, spec)
        calibrate(model, [x])
    model.train()
    if "sadam" in name:
        opt = SAdam(
            sadam_param_groups(model), probe_buffers=list(model.buffers()), probe_every=8 if name == SADAM8 else None
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = OscillationTracker(model) if name != "float adamw" else None
    return model, opt, tracker, "eager kernels" not in name


def _step(model, opt, tracker, fused, x, y):
    use_fused_kernels(fused)
    opt.step(loss_closure(opt, lambda: F.cross_entropy(model(x), y)))
    if tracker:
        with record_function("oscillation tracking"):
            tracker.update()
    use_fused_kernels(True)


def _block_steps(opt) -> int:
    """Steps per timed block: 8, or an S-Adam cell's probe period where longer (one probe per block)."""
    return max(BLOCK, opt.param_groups[0]["probe_every"]) if isinstance(opt, SAdam) else BLOCK


def _paired(cell: list, base: list) -> str:
    """Median (min-max) over rounds of the ratio of two cells' blocks timed in the same round: a
    noisy host slows both blocks of a round alike, so this spread is narrower than the medians'."""
    r = [c / b for c, b in zip(cell, base)]
    return f"{statistics.median(r):.3f}x ({min(r):.3f}-{max(r):.3f})"


def _probe_forward(model, x, y):
    with torch.no_grad():
        F.cross_entropy(model(x), y)


def _label(name: str) -> str | None:
    """A profiler event's component by its name (our record_function labels and torch's op names)."""
    if ("fake_quantize" in name and "per_channel" in name) or name in ("LSQPerChannel", "FusedLSQPerChannelBackward"):
        return "weight fake-quant (per-channel)"
    if "fake_quantize" in name or name in ("LSQPerTensor", "LSQPerTensorBackward", "FusedLSQPerTensorBackward"):
        return "activation fake-quant (per-tensor)"
    return None


def breakdown(cell, x, y) -> dict:
    model, opt, tracker, fused = cell
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(_block_steps(opt)):
            _step(model, opt, tracker, fused, x, y)
        total = time.perf_counter() - t0
    parts = {"total_s": total}
    for e in prof.key_averages():
        label = _label(e.key)
        if label:  # the op and its backward (torch's ops: self time; ours: with their children, the compiled loops)
            t = e.cpu_time_total if e.key.startswith(("LSQ", "Fused")) else e.self_cpu_time_total
            parts[label] = parts.get(label, 0.0) + t / 1e6
        elif e.key in ("oscillation tracking", "sadam.probe"):
            parts[e.key] = e.cpu_time_total / 1e6
    return parts


def components(model_name: str, batch: int, cifar_stem: bool, rounds: int = 7) -> None:
    """Median ms of the per-step pieces the cuts of issue 20 touched, each against its reference."""
    x0 = torch.randn(batch, 64, 32, 32).relu()
    scale, zp = torch.nn.Parameter(torch.tensor([0.05])), torch.zeros(1, dtype=torch.int32)
    ops = {
        "relu": lambda x: torch.relu(x),
        "torch _fake_quantize_learnable_per_tensor_affine": lambda x: torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, zp.float(), 0, 15, 1e-3
        ),
        "qat-sadam LSQPerTensor (eager kernels)": lambda x: LSQPerTensor.apply(x, scale, zp, 0, 15, 1e-3),
        "qat-sadam FusedLSQPerTensor (torch.compile)": lambda x: FusedLSQPerTensor.apply(x, scale, zp, 0, 15, 1e-3),
    }
    x = x0.clone().requires_grad_()
    FusedLSQPerTensor.apply(x, scale, zp, 0, 15, 1e-3).backward(torch.ones_like(x0))  # it compiles on first use
    times = {k: [] for k in ops}
    for _ in range(rounds):
        for k, op in ops.items():
            x = x0.clone().requires_grad_()
            t0 = time.perf_counter()
            op(x).backward(torch.ones_like(x0))
            times[k].append(1e3 * (time.perf_counter() - t0))
    print(f"\nforward + backward on a ({batch}, 64, 32, 32) activation, W4 levels, median of {rounds}:\n")
    print("| op | ms | / torch's op |\n|---|---|---|")
    ref = statistics.median(times["torch _fake_quantize_learnable_per_tensor_affine"])
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.1f} | {statistics.median(v) / ref:.2f}x |")
    model, _, tracker, _ = _cell("QAT W4A4 adamw (LSQ)", model_name, torch.randn(8, 3, 32, 32), cifar_stem)
    weights = [w for w, _ in tracker.tracked]
    ms = {True: [], False: []}
    for r in range(rounds + 2):  # the first two: the fused update compiles its shape variants
        with torch.no_grad():
            for w in weights:
                w.add_(torch.randn_like(w), alpha=1e-3)  # a training step's worth of movement
        for fused in ms:
            use_fused_kernels(fused)
            t0 = time.perf_counter()
            tracker.update()
            ms[fused].append(1e3 * (time.perf_counter() - t0))
    use_fused_kernels(True)
    n = sum(w.numel() for w in weights) / 1e6
    print(
        f"\noscillation tracker update over {n:.1f} M weights, median of {rounds}: "
        f"{statistics.median(ms[True][2:]):.0f} ms fused, {statistics.median(ms[False][2:]):.0f} ms eager"
    )
    quantized = list(quantized_weights(model).items())
    ms = {True: [], False: []}
    for r in range(rounds + 2):
        for fused in ms:  # fused: FusedLSQPerChannel; eager: torch's learnable per-channel op
            use_fused_kernels(fused)
            t0 = time.perf_counter()
            for w, q in quantized:
                q(w).backward(torch.ones_like(w))
            ms[fused].append(1e3 * (time.perf_counter() - t0))
    use_fused_kernels(True)
    print(
        f"weight fake-quant forward + backward over all {len(quantized)} weights, median of {rounds}: "
        f"{statistics.median(ms[True][2:]):.0f} ms fused, {statistics.median(ms[False][2:]):.0f} ms torch's op"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "mobilenet_v2", "small_cnn"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--imagenet-stem",
        action="store_true",
        help="MobileNetV2 with torchvision's stem (total stride 32: 1x1 maps at 32x32 input) instead of the "
        "CIFAR stem (stride 8) that recipes/mobilenet_v2_*.yaml train; ResNet-18 always has its CIFAR stem",
    )
    ap.add_argument("--host-memory", default="auto", choices=HOST_MEMORY_MODES)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--components", action="store_true", help="time the pieces the cuts touched, then stop")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=CELLS[1:], help="cells left out (the float cell always runs)"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.imagenet_stem and a.model != "mobilenet_v2":
        ap.error("--imagenet-stem is a MobileNetV2 option")
    cifar_stem = a.model in CIFAR_STEM_MODELS and not a.imagenet_stem
    host_memory = set_host_memory(a.host_memory)
    if a.components:
        return components(a.model, a.batch, cifar_stem)
    x, y = torch.randn(a.batch, 3, 32, 32), torch.randint(0, 100, (a.batch,))
    names = [n for n in CELLS if n not in a.skip]
    cells = {n: _cell(n, a.model, x, cifar_stem) for n in names}
    for cell in cells.values():
        for _ in range(WARMUP):
            _step(*cell, x, y)
    blocks = {n: (lambda c=cells[n]: _step(*c, x, y)) for n in names}
    length = {n: _block_steps(cells[n][1]) for n in names} | {PROBE: BLOCK}
    if {QAT, SADAM} <= set(cells):  # what S-Adam's probes run: forwards of the QAT model without autograd
        blocks[PROBE] = lambda m=cells[QAT][0]: _probe_forward(m, x, y)
    times = {n: [] for n in blocks}
    sys_s, faults = {n: 0.0 for n in blocks}, {n: 0 for n in blocks}
    order = list(blocks)
    with tqdm(total=a.rounds * len(order), desc="blocks") as bar:
        for r in range(a.rounds):
            for n in order[r % len(order) :] + order[: r % len(order)]:  # rotate the order
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                for _ in range(length[n]):
                    blocks[n]()
                times[n].append((time.perf_counter() - t0) / length[n])
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                sys_s[n] += r1.ru_stime - r0.ru_stime
                faults[n] += r1.ru_minflt - r0.ru_minflt
                bar.update()
    f = statistics.median(times["float adamw"])
    print(
        f"\n{a.model} ({'CIFAR' if cifar_stem else 'own or ImageNet'} stem), batch {a.batch}, {a.threads} thread(s), "
        f"{a.rounds} rounds of one block per cell ({BLOCK} steps, an S-Adam cell's probe period where longer), "
        f"host memory: {host_memory}\n"
    )
    print(
        "| cell | s/step (median) | min-max | / float step | system s/step | page faults/step "
        "|\n|---|---|---|---|---|---|"
    )
    for n in order:
        m, steps = statistics.median(times[n]), a.rounds * length[n]
        print(
            f"| {n} | {m:.3f} | {min(times[n]):.3f}-{max(times[n]):.3f} | {m / f:.2f}x | "
            f"{sys_s[n] / steps:.3f} | {faults[n] / steps:.0f} |"
        )
    if PROBE in times:
        share = statistics.median(times[PROBE]) / statistics.median(times[QAT])
        for n in (SADAM, SADAM8):
            if n in cells:
                g = cells[n][1].param_groups[0]
                print(
                    f"\n{n}: {2 * g['k']} probe forwards without gradients every {g['probe_every']} steps, one costing "
                    f"{share:.2f} of a QAT AdamW step: a floor of {1 + 2 * g['k'] / g['probe_every'] * share:.3f}x "
                    "AdamW; "
                    f"measured {statistics.median(times[n]) / statistics.median(times[QAT]):.3f}x; "
                    f"paired by round {_paired(times[n], times[QAT])}"
                )
    if a.profile:
        print("\nShare of a block (fake-quant: the ops' own time, forward and backward):\n")
        print(
            "| cell | block s | weight fake-quant | activation fake-quant | oscillation tracking | S-Adam probes | "
            "rest |"
        )
        print("|---|---|---|---|---|---|---|")
        for n in names[1:]:
            p = breakdown(cells[n], x, y)
            share = lambda k: f"{100 * p.get(k, 0.0) / p['total_s']:.1f}%"  # noqa: E731
            rest = p["total_s"] - sum(v for k, v in p.items() if k != "total_s")
            print(
                f"| {n} | {p['total_s']:.2f} | {share('weight fake-quant (per-channel)')} | "
                f"{share('activation fake-quant (per-tensor)')} | {share('oscillation tracking')} | "
                f"{share('sadam.probe')} | {100 * rest / p['total_s']:.1f}% |"
            )


if __name__ == "__main__":
    main()
