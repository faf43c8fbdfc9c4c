"""Fine-tuning and linear evaluation, driven by hydra: ``python -m spark_sparse.finetune key=value ...``.

``mode=finetune`` trains the whole timm network with SparK's downstream recipe for the model;
``mode=linear`` trains a linear head on the frozen encoder's pooled features. ``pretrained=``
takes a pretraining run directory or a timm state dict file; null trains from random
initialisation, the baseline. The run directory receives metrics.jsonl (one record per epoch:
train loss, val top-1/top-5 of the model and of its EMA), checkpoints/last.pt (everything needed
to resume exactly, even mid-epoch) and checkpoints/best.pt (the weights with the best val top-1).

Data-parallel under ``torchrun --nproc_per_node=N -m spark_sparse.finetune ...`` as pretraining:
DistributedDataParallel, batch_size stays the global batch (each process takes its share of every
global batch, with the same crops as one process), each process evaluates its share of the val
set and the counts are summed, rank 0 alone writes the run directory. The run's life (directory,
resume, signals, saves) is the shared skeleton's (spark_sparse/run/).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from ..run import distributed
from ..run.checks import ConfigError
from ..run.cli import run_app
from ..run.failures import LESS_MEMORY, RunFailed, TrainingDiverged
from ..run.recipe import CONF_DIR
from ..run.signals import Stopped
from ..run.trainer import Run, launch
from .checks import CHANGEABLE_ON_RESUME, FIXED_ON_RESUME, validate
from .classifier import build_model, load_encoder
from .data import EpochBatches, build_datasets, loader
from .evaluate import evaluate
from .optim import build_ema, build_mixup, build_optimizer, build_scheduler, criterion

__all__ = ["ConfigError", "FineTuning", "RunFailed", "Stopped", "TrainingDiverged", "evaluate", "main", "train",
           "validate"]

BEST = "checkpoints/best.pt"  # the weights with the best val top-1


class FineTuning:
    """Fine-tuning (or linear evaluation) as the run skeleton runs it: data, model, one step, and
    an evaluation at the end of every epoch."""

    module = "spark_sparse.finetune"
    fixed_on_resume = FIXED_ON_RESUME
    changeable_on_resume = CHANGEABLE_ON_RESUME
    former_defaults: dict = {}
    outputs = (BEST,)
    memory_savers = LESS_MEMORY

    def check(self, cfg: DictConfig, world_size: int) -> None:
        validate(cfg, world_size)

    def prepare(self, cfg: DictConfig, ctx: distributed.Context) -> None:
        # the data, the model and whether the pretrained weights fit it: refused before the run
        # directory is touched
        self.train_set, self.val_set = build_datasets(cfg.data, cfg.input_size, cfg.aug, cfg.seed)
        self.train_set.check_readable()
        self.val_set.check_readable()
        if len(self.train_set) < cfg.batch_size:
            task = " of the bundled photos task (set data.train=DIR data.val=DIR for your own)" if cfg.data.train is None else ""
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(self.train_set)} "
                              f"training images{task}")
        self.model = build_model(cfg.model, cfg.mode, len(self.train_set.classes), cfg.drop_path_rate)
        if cfg.pretrained is not None:
            load_encoder(self.model, cfg.pretrained, cfg.model)

    def fit(self, run: Run) -> dict:
        cfg = run.cfg
        model = run.place(self.model)
        steps_per_epoch = len(self.train_set) // cfg.batch_size
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
        ema = build_ema(model, cfg)
        self.mixup, self.loss_fn = build_mixup(cfg, len(self.train_set.classes)), criterion(cfg)
        # the best val top-1 so far; the running epoch's train loss sum and batch count (a stop
        # mid-epoch saves them, so the resumed epoch's record is the uninterrupted one's)
        self.best, self.partial = {"top1": -1.0, "epoch": None}, (0.0, 0)
        resumed = run.track(model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                            values=lambda: {"best": self.best, "partial": self.partial})
        if resumed:
            self.best, self.partial = resumed["best"], tuple(resumed["partial"])
        # the frozen encoder of linear mode has no gradients to average: DDP syncs the head's only
        net = run.wrap(model)
        run.progress(cfg.epochs * steps_per_epoch, f"{cfg.mode} {cfg.model}")
        record: dict = {}
        net.train()
        for epoch in range(run.step // steps_per_epoch, cfg.epochs):
            first, began = run.step, time.perf_counter()
            batches = EpochBatches(len(self.train_set), cfg.batch_size, cfg.seed, epoch, first - epoch * steps_per_epoch,
                                   cfg.aug.repeats, run.ctx.rank, run.ctx.world_size)
            for images, targets in loader(self.train_set, batches, cfg.data.num_workers):
                self.step(run, net, model, optimizer, scheduler, ema, images, targets, epoch)
                if run.step % steps_per_epoch:  # mid-epoch: the evaluation comes after the resumed rest
                    run.stop_if_requested()
            record = self.end_epoch(run, model, ema, optimizer, epoch,
                                    (run.step - first) * cfg.batch_size / (time.perf_counter() - began))
            run.save()
            if epoch + 1 < cfg.epochs:
                run.stop_if_requested()
        return {"step": run.step, "last": record, "best": self.best, "run_dir": run.files.root,
                "checkpoint": run.files.checkpoint, "best_checkpoint": run.files.root / BEST,
                "world_size": run.ctx.world_size}

    def step(self, run: Run, net: nn.Module, model: nn.Module, optimizer, scheduler, ema, images: torch.Tensor,
             targets: torch.Tensor, epoch: int) -> None:
        """One optimizer step on this process's share of a global batch."""
        images, targets = images.to(run.device), targets.to(run.device)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        scheduler.step_update(run.step)
        # equal shares: the mean of the ranks' losses is the global batch's loss
        with run.autocast():
            loss = self.loss_fn(net(images), targets)
        loss, _ = run.optimize(loss, optimizer, model.parameters(), run.cfg.optim.clip_grad)
        step = run.advance(epoch=epoch + 1, loss=f"{loss:.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
        if ema is not None:
            ema.update(model, step=step)
        self.partial = (self.partial[0] + loss, self.partial[1] + 1)

    def end_epoch(self, run: Run, model: nn.Module, ema, optimizer, epoch: int, images_per_s: float) -> dict:
        """The epoch's record: train loss, val scores of the model and its EMA, the best so far
        (whose weights go to checkpoints/best.pt)."""
        cfg = run.cfg
        record = {"step": run.step, "epoch": epoch + 1, "train_loss": self.partial[0] / max(self.partial[1], 1),
                  "lr": max(g["lr"] for g in optimizer.param_groups), "images_per_s": images_per_s}
        self.partial = (0.0, 0)
        for prefix, judged in (("val", model), ("ema", ema.module if ema is not None else None)):
            if judged is not None:
                scores = evaluate(judged, self.val_set, cfg.batch_size // run.ctx.world_size, run.device,
                                  cfg.data.num_workers, cfg.precision)
                record.update({f"{prefix}_{k}": v for k, v in scores.items()})
        if record["val_top1"] > self.best["top1"]:
            self.best = {"top1": record["val_top1"], "epoch": epoch + 1}
            run.write(lambda: {"model": model.state_dict(), "epoch": epoch + 1, "val_top1": record["val_top1"],
                               "config": run.config}, run.files.root / BEST, f"the best weights (epoch {epoch + 1})")
        record["best_top1"] = self.best["top1"]
        run.log(record)
        return record


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) one fine-tuning or linear evaluation; returns a summary with the final and
    best val accuracy and the output paths. A first SIGINT/SIGTERM saves a checkpoint after the
    current step and raises Stopped."""
    return launch(cfg, run_dir, FineTuning())


@hydra.main(config_path=CONF_DIR, config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float:
    summary = run_app(cfg, FineTuning.module, train)
    if summary is None:
        return float("nan")
    last, best = summary["last"], summary["best"]
    processes = f" ({summary['world_size']} processes)" if summary["world_size"] > 1 else ""
    print(f"done: {cfg.mode} {cfg.model}, {summary['step']} steps{processes}; "
          f"val top-1 {last.get('val_top1', float('nan')):.2f}%"
          + (f" (EMA {last['ema_top1']:.2f}%)" if "ema_top1" in last else "")
          + f", best {best['top1']:.2f}% at epoch {best['epoch']}\n"
          f"  run directory:   {summary['run_dir']}\n"
          f"  checkpoint:      {summary['checkpoint']}\n"
          f"  best weights:    {summary['best_checkpoint']}")
    return best["top1"]
