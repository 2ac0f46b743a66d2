"""The stages a run is made of, as functions the workflows compose: set up the host and the data,
build the recipe's model from its starting weights (scored as the float rung of the ladder),
quantize it, calibrate it and re-estimate its BatchNorm (the PTQ model), and evaluate the numerics
it deploys. The Trainer adds the training loop; ``ptq`` and ``eval`` use the stages alone and
build no optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExportError, RecipeError, TrainingStopped
from ..export import DEFAULT_TARGET, freeze, integer_reference, load_target
from ..metrics import Score
from ..quant import calibrate, fused_kernels_buildable, reestimate_batchnorm, use_fused_kernels
from .data import Loader, load_data
from .host_memory import set_host_memory
from .model import build_float_model, quantize_model
from .recipe import Recipe

# The epochs the calibration and BatchNorm re-estimation batches are drawn from: never a training epoch's.
CALIBRATION_EPOCH, BN_EPOCH = -1, -2


def resolve_device(name: str, world: int = 1, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingStopped("device: cuda was asked for but no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


@dataclass
class Setup:
    """The host and the data a recipe runs on."""

    device: torch.device
    fake_quant_kernels: str  # fused or eager: what ran
    host_memory: str
    info: dict  # num_classes, in_channels, image_size, mean, std
    train_loader: Loader  # this rank's share of every batch
    calibration_loader: Loader  # unsharded: calibration and BatchNorm re-estimation see the same batches on every rank
    test_loader: Loader


def setup(recipe: Recipe, rank: int = 0, world: int = 1, local_rank: int = 0) -> Setup:
    """Seed, choose the fake-quant kernels and the host memory mode, read the data into loaders."""
    device = resolve_device(recipe.device, world, local_rank)
    torch.manual_seed(recipe.seed)
    kernels = recipe.fake_quant_kernels
    if kernels == "auto":
        kernels = "fused" if fused_kernels_buildable(device) else "eager"
    use_fused_kernels(kernels == "fused")
    host_memory = set_host_memory(recipe.host_memory)
    data = load_data(recipe.data)
    info = {
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "task": data.task,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    d, aug = recipe.data, recipe.data.augment
    loader = dict(shuffle=True, seed=recipe.seed, crop_padding=aug.crop_padding, flip=aug.flip, device=device)
    # Every rank walks the same global batches and takes its share of each (DistributedSampler's
    # role, seeded by (seed, epoch) like its set_epoch): N ranks with B/N match one process with B.
    train = Loader(data.train, d.batch_size, data.mean, data.std, rank=rank, world=world, **loader)
    calibration = Loader(data.train, d.batch_size, data.mean, data.std, **loader)
    test = Loader(data.test, d.eval_batch_size, data.mean, data.std, shuffle=False, device=device)
    return Setup(device, kernels, host_memory, info, train, calibration, test)


def start_model(recipe: Recipe, s: Setup, load_start: bool = True) -> tuple[nn.Module, dict]:
    """The recipe's model prepared for QAT (the float model for a float recipe), from its starting
    weights when ``load_start``; and what it started from, with the float model's test accuracy and
    loss (the top rung of the ladder, before any quantizer), or {} from random weights."""
    float_model, start = build_float_model(recipe, s.info, load_start=load_start)
    float_model.to(s.device)
    _check_model_output(float_model, recipe, s)
    if start:
        start["float_acc"], start["float_loss"] = score(float_model.eval(), s.test_loader)
    return quantize_model(recipe, float_model), start


@torch.no_grad()
def _check_model_output(model: nn.Module, recipe: Recipe, s: Setup) -> None:
    """RecipeError, one line, unless the model maps a batch to logits (N, classes), or (N, classes, H, W)
    for a segmentation dataset: what a recipe trains with cross-entropy and scores (a model with
    several outputs trains in the user's loop and exports through the Python API)."""
    x, _ = next(iter(s.test_loader.batches()))
    was_training = model.training
    try:
        out = model.eval()(x[:2])
    except Exception as e:  # the user's forward: its error, in one line
        raise RecipeError(
            f"model {recipe.model.name!r} fails on the data's images {tuple(x.shape[1:])}: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        ) from None
    finally:
        model.train(was_training)
    classes, size = s.info["num_classes"], s.info["image_size"]
    want = (2, classes) if s.info["task"] == "classification" else (2, classes, size, size)
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == want):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RecipeError(
            f"model {recipe.model.name!r} returns {got} for a batch of 2; a recipe for {s.info['task']} "
            f"trains a model returning logits {want} for the data's {classes} classes"
        )


def post_training_quantize(model: nn.Module, recipe: Recipe, s: Setup, start: dict) -> None:
    """Calibrate the activation scales; from trained weights (``start``) also re-estimate BatchNorm
    with the quantized weights, recorded in ``start["bn_reestimate"]``: the PTQ model that QAT
    starts from."""
    if recipe.calibration_batches:
        calibrate(model, s.calibration_loader.batches(epoch=CALIBRATION_EPOCH), recipe.calibration_batches)
    if start and recipe.bn_reestimate_batches:
        start["bn_reestimate"] = reestimate_bn(model, recipe, s)


def reestimate_bn(model: nn.Module, recipe: Recipe, s: Setup) -> dict:
    return reestimate_batchnorm(model, s.calibration_loader.batches(epoch=BN_EPOCH), recipe.bn_reestimate_batches)


def deployed_weight_bits(recipe: Recipe) -> int | None:
    """The weight container of the target a run exports to (7 bits on cpu-x86), which changes the
    numbers the deployed model computes; None when the run does not export."""
    ex = recipe.export
    return load_target(ex.target or DEFAULT_TARGET).weight_bits_max if ex.enabled else None


@torch.no_grad()
def score(net: nn.Module, loader: Loader) -> tuple[float, float]:
    """The task's score over the loader (top-1 accuracy; mIoU for dense labels, ``metrics.Score``)
    and the mean cross-entropy per label (per image, or per pixel of a dense one)."""
    s, loss_sum, total = Score(), 0.0, 0
    for x, y in loader.batches():
        out = net(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        total += y.numel()
        s.update(out, y)
    return s.value(), loss_sum / total


@torch.no_grad()
def evaluate_deployed(model: nn.Module, recipe: Recipe, loader: Loader, weight_bits_max: int | None) -> dict:
    """Test accuracy of the deployed numerics (the frozen graph's integer reference: BatchNorm
    folded, int32 bias, integer requantization, weights in the export target's container, what
    ONNX Runtime computes) and of the QAT graph as trained. A model that has no integer graph (the
    paper's conv-inputs-only placement) is evaluated as trained; a float recipe as float."""
    was = model.training
    model.eval()
    try:
        if not recipe.quantized:
            acc, loss = score(model, loader)
            return {"test_acc": acc, "test_loss": loss, "eval_graph": "float"}
        try:
            frozen, _ = freeze(model, weight_bits_max)
        except ExportError:
            frozen = None
        qat = score(model, loader)
    finally:
        model.train(was)
    if frozen is None:
        return {"test_acc": qat[0], "test_loss": qat[1], "eval_graph": "qat"}
    acc, loss = score(integer_reference(frozen), loader)
    return {"test_acc": acc, "test_loss": loss, "eval_graph": "integer", "test_acc_qat_graph": qat[0]}
