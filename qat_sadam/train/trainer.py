"""The trainer: recipe in, run directory out (metrics.jsonl, checkpoints, summary).

A run starts from random weights or, for a fine-tune, from trained float weights: then the float
model's accuracy is measured first, the prepared model is calibrated and its BatchNorm statistics
re-estimated with the quantized weights, and that post-training-quantized state is saved as the
run's PTQ checkpoint before the first step (the PTQ rung of the accuracy ladder)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections import deque

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import RecipeError, TrainingStopped
from ..optim import SAdam
from . import distributed
from .checkpoint import save_atomic
from .model import build_float_model, load_run_state
from .optimizers import build_optimizer
from .oscillation import OscillationTracker
from .oscillation_fixes import WeightFreezer, annealed, dampening_loss
from .pipeline import deployed_weight_bits, evaluate_deployed, post_training_quantize, reestimate_bn, setup, start_model
from .recipe import Recipe, dump_recipe
from .run import BEST, LAST, PREVIOUS, PTQ, Run
from .tensorboard_log import TensorBoardLog

LOSS_WINDOW = 50
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteError(RuntimeError):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _lr_lambda(epochs_steps: int, warmup: int, kind: str, min_ratio: float):
    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if kind == "constant":
            return w
        return w * (
            min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, epochs_steps) / epochs_steps))
        )

    return f


class Trainer:
    """The training loop over the pipeline's stages (train/pipeline.py): set up, start the model,
    quantize it post-training, then fit. ``resume``: continue from the run's last checkpoint."""

    def __init__(self, recipe: Recipe, run_dir: str, resume: bool = False, progress: bool = True):
        self.recipe, self.run = recipe, Run(run_dir)
        self.rank, self.world, local_rank = distributed.init_from_env()
        self.progress = progress and self.rank == 0
        self.setup = setup(recipe, self.rank, self.world, local_rank)
        self.device, self.info, self.train_loader = self.setup.device, self.setup.info, self.setup.train_loader
        self.model, self.start = start_model(recipe, self.setup, load_start=not resume)
        self.teacher = self._teacher() if recipe.distill.enabled else None
        self.optimizer = build_optimizer(
            recipe.optimizer, self.model, seed=recipe.seed, probe_buffers=list(self.model.buffers())
        )
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = recipe.epochs * self.steps_per_epoch
        if recipe.max_steps:
            self.total_steps = min(self.total_steps, recipe.max_steps)
        s = recipe.schedule
        base_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _lr_lambda(
                self.total_steps,
                int(s.warmup_epochs * self.steps_per_epoch),
                s.name,
                s.min_lr / base_lr if base_lr else 0.0,
            ),
        )
        self._track_oscillations()
        self.weight_bits_max = deployed_weight_bits(recipe)  # evaluated as exported
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.best_acc, self.skipped = -1.0, 0
        self.tb: TensorBoardLog | None = None  # open while train() runs
        self.losses: deque = deque(maxlen=LOSS_WINDOW)
        self._stop_signal: int | None = None  # SIGINT or SIGTERM: save at the next step boundary, then stop
        self.resume_note: str | None = None
        self.bn_report: dict = {}
        if resume:
            ck, self.resume_note = self.run.resume_checkpoint()
            self._restore(ck)
        elif recipe.quantized:
            post_training_quantize(self.model, recipe, self.setup, self.start)
            self._track_oscillations()  # integer weights after calibration are the reference for the first flip
        self.net = self._data_parallel() if self.world > 1 else self.model
        if recipe.compile:  # training forward only: evaluation and export read self.model
            self.net = torch.compile(self.net)

    def _teacher(self) -> torch.nn.Module:
        """The float model the fine-tune starts from, loaded again (a resumed run has not loaded it)."""
        with torch.random.fork_rng(devices=[]):  # its fresh init must not shift the run's random stream
            teacher, loaded = build_float_model(self.recipe, self.info)
        if loaded["reset_classifier"]:
            raise RecipeError(
                f"distill: the float teacher's classifier ({', '.join(loaded['reset_classifier'])}) "
                "was re-initialised (model.reset_classifier): it has nothing to teach"
            )
        return teacher.to(self.device).eval().requires_grad_(False)

    def _track_oscillations(self) -> None:
        """The oscillation tracker and, with ``freezing``, the weight freezer that reads it."""
        self.tracker = OscillationTracker(self.model) if self.recipe.logging.oscillations else None
        self.freezer = None
        if self.recipe.freezing.enabled:
            try:
                self.freezer = WeightFreezer(self.tracker)
            except ValueError as e:
                raise RecipeError(f"freezing.enabled: {e}") from None

    def _data_parallel(self) -> torch.nn.Module:
        if self.recipe.model.sync_bn:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # -- files ----------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.run.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.record(record)

    def checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tracker": self.tracker.state_dict() if self.tracker else None,
            "freezer": self.freezer.state_dict() if self.freezer else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_acc": self.best_acc,
            "skipped": self.skipped,
            "losses": list(self.losses),
            "start": self.start,
            "bn_report": self.bn_report,
            "recipe": self.recipe.to_dict(),
            "info": self.info,
        }

    def save(self, name: str = LAST) -> str:
        """Write a checkpoint; the last one held until now stays as the previous one (a fallback for
        --resume when the newest is damaged)."""
        if self.rank == 0:  # every rank holds the same state
            save_atomic(
                self.checkpoint(),
                self.run.checkpoint(name),
                previous=self.run.checkpoint(PREVIOUS) if name == LAST else None,
            )
        return self.run.checkpoint(name)

    def _restore(self, ck: dict) -> None:
        load_run_state(self.model, ck["model"], self.run.checkpoint(LAST), self.info)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.tracker and ck["tracker"]:
            self.tracker.load_state_dict({k: [t.to(self.device) for t in v] for k, v in ck["tracker"].items()})
        if self.freezer and ck.get("freezer"):
            self.freezer.load_state_dict({k: [t.to(self.device) for t in v] for k, v in ck["freezer"].items()})
        torch.set_rng_state(ck["rng_cpu"].cpu())
        if ck["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng_cuda"]])
        self.epoch, self.step_in_epoch, self.global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        self.best_acc, self.skipped = ck["best_acc"], ck["skipped"]
        self.start, self.bn_report = ck["start"], ck["bn_report"]
        self.losses.extend(ck["losses"])
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop records written after the checkpoint: the resumed run writes those steps again."""
        path = self.run.metrics_file
        if self.rank != 0 or not os.path.isfile(path):
            return
        with open(path) as f:
            keep = [line for line in f if (step := _record_step(line)) is not None and step <= self.global_step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)

    # -- steps ----------------------------------------------------------------------------
    def _loss(self, logits, y, teacher_log_probs):
        ce = F.cross_entropy(logits, y)
        if teacher_log_probs is None:
            return ce
        d = self.recipe.distill
        t = d.temperature
        kd = F.kl_div(F.log_softmax(logits / t, 1), teacher_log_probs, reduction="batchmean", log_target=True) * t * t
        return (1 - d.alpha) * ce + d.alpha * kd

    def _annealed(self, start: float, final: float, anneal_start: float) -> float:
        """A Nagel et al. schedule's value at the coming step (train/oscillation_fixes.py)."""
        return annealed(self.global_step, self.total_steps, start, final, anneal_start)

    def _dampening_weight(self) -> float | None:
        d = self.recipe.dampening
        return self._annealed(d.weight, d.weight_final, d.anneal_start) if d.enabled else None

    def _freeze_threshold(self) -> float | None:
        """None (freeze nothing) before the threshold's annealing starts, as in the reference code."""
        f = self.recipe.freezing
        if not f.enabled or self.global_step < f.anneal_start * self.total_steps:
            return None
        return self._annealed(f.threshold, f.threshold_final, f.anneal_start)

    def _closure(self, x, y):
        clip = self.recipe.grad_clip
        damp = self._dampening_weight()
        teacher = None
        if self.teacher is not None:  # once per step: S-Adam's probes call the closure again with the same batch
            with torch.no_grad():
                teacher = F.log_softmax(self.teacher(x) / self.recipe.distill.temperature, 1)

        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(self.net(x), y, teacher)
            if damp:  # S-Adam's probes measure the same objective
                loss = loss + damp * dampening_loss(self.model, self.recipe.dampening.aggregation)
            if torch.is_grad_enabled():
                loss.backward()
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                norm = (
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                    if clip
                    else torch.nn.utils.get_total_norm(grads)
                )
                ok = torch.isfinite(loss) & torch.isfinite(norm)
                if not bool(ok):
                    raise NonFiniteError("loss" if not torch.isfinite(loss) else "gradient")
            return loss.detach()

        return closure

    def _train_step(self, x, y) -> float | None:
        try:
            loss = self.optimizer.step(self._closure(x, y))
        except NonFiniteError as e:
            self.optimizer.zero_grad(set_to_none=True)
            if self.recipe.nan_policy == "stop":
                last = self.run.checkpoint(LAST) if self.run.has_checkpoint(LAST) else "none written yet"
                raise TrainingStopped(
                    f"non-finite {e.what} at step {self.global_step} (epoch {self.epoch}); last good checkpoint: {last}"
                ) from None
            self.skipped += 1
            return None
        self.scheduler.step()
        return float(distributed.mean(loss))

    def evaluate(self) -> dict:
        """The deployed numerics' test accuracy (pipeline.evaluate_deployed)."""
        return evaluate_deployed(self.model, self.recipe, self.setup.test_loader, self.weight_bits_max)

    def _rho(self) -> tuple[float | None, float | None]:
        if isinstance(self.optimizer, SAdam):
            return self.optimizer.rho[0], self.optimizer.damping[0]
        return None, None

    # -- loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to the end; on SIGINT (Ctrl-C) or SIGTERM (what schedulers send before they preempt)
        save at the next step boundary and return {"interrupted": True, "signal": ...}."""
        self.write_run_files()
        self._log(
            {"type": "kernels", "fake_quant": self.setup.fake_quant_kernels, "host_memory": self.setup.host_memory}
        )
        self.tb = TensorBoardLog(self.run.dir, self.recipe, self.global_step, enabled=self.rank == 0)
        self.tb.ladder(self.start)
        previous = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS} if _main_thread() else {}
        try:
            return self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.tb.close()
            self.tb = None

    def write_run_files(self) -> None:
        """The run directory, its recipe and, before the first step of a fine-tune, the PTQ state."""
        if self.rank == 0:
            self.run.create()
            dump_recipe(self.recipe, self.run.recipe_file)
        if self.global_step == 0 and self.start and self.recipe.quantized:
            self.save(PTQ)

    def _request_stop(self, signum, _frame):
        self._stop_signal = signum

    def _stopping(self) -> bool:
        """Whether any rank was asked to stop: all ranks stop at the same step, or the next
        collective would wait forever for the ones that left."""
        return distributed.any_rank(self._stop_signal is not None)

    def _loop(self) -> dict:
        r = self.recipe
        every_ckpt = r.checkpoint.every_steps
        self.model.train()
        interrupted = False
        while self.epoch < r.epochs and self.global_step < self.total_steps:
            t_epoch, epoch_losses, dampings = time.perf_counter(), [], []
            bar = tqdm(
                self.train_loader.batches(self.epoch, self.step_in_epoch),
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                desc=f"epoch {self.epoch + 1}/{r.epochs}",
                disable=None if self.progress else True,
                leave=False,
                dynamic_ncols=True,
            )
            for x, y in bar:
                t0 = time.perf_counter()
                damp = self._dampening_weight()  # the weight this step's loss uses
                loss = self._train_step(x, y)
                self.global_step += 1
                self.step_in_epoch += 1
                rec = {
                    "type": "step",
                    "epoch": self.epoch,
                    "step": self.global_step,
                    "loss": loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "skipped": loss is None,
                }
                rec["rho"], rec["damping"] = self._rho()
                if damp is not None:
                    rec["dampening_weight"] = damp
                if loss is not None:
                    self.losses.append(loss)
                    epoch_losses.append(loss)
                if rec["damping"] is not None:
                    dampings.append(rec["damping"])
                if len(self.losses) >= 2:
                    rec["loss_var50"] = float(torch.tensor(list(self.losses)).var())
                if self.tracker:
                    threshold = self._freeze_threshold() if self.freezer else None
                    if threshold is not None:  # frozen weights back on their codes before the tracker reads
                        self.freezer.hold()  # them; none can be frozen before the threshold's schedule starts
                    osc = self.tracker.update()
                    if self.freezer:
                        rec["freeze_threshold"] = threshold
                        osc["frozen_frac"] = self.freezer.update(threshold)
                    rec.update(zip(osc, torch.stack([v.float() for v in osc.values()]).tolist()))  # one host sync
                rec["sec"] = time.perf_counter() - t0
                self._log(rec)
                bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "skip")
                if every_ckpt and self.global_step % every_ckpt == 0:
                    self.save()
                if self._stopping() or self.global_step >= self.total_steps:
                    interrupted = self._stop_signal is not None or self.global_step < self.total_steps
                    break
            bar.close()
            if interrupted:
                self.save()
                self._log({"type": "interrupted", "step": self.global_step})
                name = signal.Signals(self._stop_signal).name if self._stop_signal else "SIGTERM (on another rank)"
                return {
                    "interrupted": True,
                    "signal": name,
                    "checkpoint": self.run.checkpoint(LAST),
                    "step": self.global_step,
                    "rank": self.rank,
                }
            if self.step_in_epoch >= self.steps_per_epoch or self.global_step >= self.total_steps:
                self._end_epoch(
                    time.perf_counter() - t_epoch,
                    epoch_losses,
                    dampings,
                    complete=self.step_in_epoch >= self.steps_per_epoch,
                )
        return self.summary()

    def _end_epoch(self, seconds: float, losses: list, dampings: list, complete: bool = True) -> None:
        """Evaluate and checkpoint; a run cut by max_steps ends a partial epoch that --resume continues.
        After the last step BatchNorm is re-estimated with the final quantized weights (if the recipe
        says so), and the accuracy before it is logged beside the one after."""
        before = {}
        if self.global_step >= self.total_steps and self.recipe.bn_reestimate_batches and self.recipe.quantized:
            before = {"test_acc_before_bn_reestimate": self.evaluate()["test_acc"]}
            self.bn_report = reestimate_bn(self.model, self.recipe, self.setup)
        ev = self.evaluate()
        rec = {
            "type": "epoch",
            "epoch": self.epoch + 1,
            "complete": complete,
            "step": self.global_step,
            "sec_epoch": seconds,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "mean_damping": sum(dampings) / len(dampings) if dampings else None,
            **ev,
            **before,
            **self.bn_report,
        }
        self._log(rec)
        if self.tb is not None:
            self.tb.scales(self.model, rec["epoch"])
        if complete:
            self.epoch += 1
            self.step_in_epoch = 0
        if ev["test_acc"] > self.best_acc:
            self.best_acc = ev["test_acc"]
            self.save(BEST)
        self.save()
        if self.progress:
            tqdm.write(
                f"epoch {rec['epoch']}: train loss {rec['train_loss'] or float('nan'):.4f}  "
                f"test acc {ev['test_acc']:.4f}  ({seconds:.1f} s)"
            )

    def summary(self) -> dict:
        state = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        rank_diff = distributed.max_diff_from_rank0(state)
        if self.rank != 0:
            return {"rank": self.rank, "rank_max_state_diff": rank_diff}
        steps = [json.loads(line) for line in open(self.run.metrics_file)]
        epochs = [s for s in steps if s["type"] == "epoch"]
        damp = [s["damping"] for s in steps if s["type"] == "step" and s.get("damping") is not None]
        last = [s for s in steps if s["type"] == "step"][-1]
        summary = {
            "run_dir": self.run.dir,
            "epochs": len(epochs),
            "steps": self.global_step,
            "final_acc": epochs[-1]["test_acc"] if epochs else None,
            "best_acc": self.best_acc,
            "sec_per_epoch": sum(e["sec_epoch"] for e in epochs) / len(epochs) if epochs else None,
            "mean_damping": sum(damp) / len(damp) if damp else None,
            "skipped_steps": self.skipped,
            "loss_var50": last.get("loss_var50"),
            "world_size": self.world,
            "rank_max_state_diff": rank_diff,
            "start": self.start,
            "bn_reestimate": self.bn_report,
            **{k: epochs[-1][k] for k in ("test_acc_before_bn_reestimate",) if epochs and k in epochs[-1]},
            **({"float_acc": self.start["float_acc"]} if "float_acc" in self.start else {}),
            **{k: last[k] for k in ("osc_freq_mean", "osc_frac_0.005", "osc_frac_0.01", "frozen_frac") if k in last},
        }
        self.run.write_summary(summary)
        return summary


def _record_step(line: str) -> int | None:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut short by a crash
        return None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
