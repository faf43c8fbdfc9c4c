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
set and the counts are summed, rank 0 alone writes the run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data.seeds import derive_seed
from ..run import distributed
from ..run.checks import ConfigError
from ..run.checkpoint import Saver, atomic_save, load_checkpoint
from ..run.cli import run_app
from ..run.failures import RunFailed, TrainingDiverged, is_out_of_memory, out_of_memory
from ..run.logger import NullLogger, RunLogger
from ..run.recipe import register_resolver
from ..run.rng import restore_rng, rng_state, seed_everything
from ..run.run_dir import RunDirLock, checkpoint_path, open_run_dir
from ..run.runtime import configure_cpu
from ..run.signals import StopSignals, Stopped
from .checks import FIXED_ON_RESUME, validate
from .classifier import build_model, load_encoder
from .data import EpochBatches, Labelled, build_datasets, loader
from .evaluate import evaluate
from .optim import build_optimizer, criterion, mixing

__all__ = ["ConfigError", "RunFailed", "TrainingDiverged", "evaluate", "main", "train", "validate"]


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) one fine-tuning or linear evaluation; returns a summary with the final and
    best val accuracy and the output paths. A first SIGINT/SIGTERM saves a checkpoint after the
    current step and raises Stopped."""
    register_resolver()  # ${recipe:KEY}: the model's SparK downstream recipe
    ctx = distributed.init_from_env(cfg.dist_timeout_s)
    validate(cfg, ctx.world_size)
    run_dir = Path(run_dir)
    configure_cpu(cfg.threads)
    # everything that can be refused is checked before the run directory is touched: the data,
    # the model, and whether the pretrained weights fit it
    train_set, val_set = build_datasets(cfg.data, cfg.input_size, cfg.aug, cfg.seed)
    train_set.check_readable()
    val_set.check_readable()
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(train_set)} training images")
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.mode, len(train_set.classes), cfg.drop_path_rate)
    if cfg.pretrained is not None:
        load_encoder(model, cfg.pretrained, cfg.model)
    lock = RunDirLock(run_dir)
    with StopSignals() as stops:
        try:
            # rank 0 judges the run directory; a refusal stops every rank with the same error
            ckpt = distributed.run_on_main(
                lambda: open_run_dir(cfg, run_dir, lock, FIXED_ON_RESUME, ["checkpoints/best.pt"]))
            if cfg.resume and not ctx.is_main:
                ckpt = load_checkpoint(checkpoint_path(run_dir))  # a shared run directory
            return _fit(cfg, run_dir, ctx, model, train_set, val_set, ckpt, stops)
        finally:
            lock.release()


def _fit(cfg: DictConfig, run_dir: Path, ctx: distributed.Context, model: nn.Module, train_set: Labelled,
         val_set: Labelled, ckpt: dict | None, stops: StopSignals) -> dict:
    if ctx.rank:  # rank 0 keeps a single process's RNG streams; drop path and mixup differ per rank
        seed_everything(derive_seed("finetune-rank", cfg.seed, ctx.rank))
    device = torch.device(cfg.device, ctx.local_rank if cfg.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model.to(device)
    steps_per_epoch = len(train_set) // cfg.batch_size
    optimizer = build_optimizer(model, cfg)
    # per-step schedule; a short run's warm-up takes at most a quarter of it
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, min_lr=cfg.optim.min_lr,
                                       warmup_epochs=min(cfg.optim.warmup_epochs, cfg.epochs / 4),
                                       warmup_lr=cfg.optim.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    ema = (ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
           if cfg.ema.decay is not None else None)
    mixup = (Mixup(mixup_alpha=cfg.mixup.mixup_alpha, cutmix_alpha=cfg.mixup.cutmix_alpha, prob=cfg.mixup.prob,
                   label_smoothing=cfg.mixup.label_smoothing, num_classes=len(train_set.classes))
             if mixing(cfg) else None)
    loss_fn = criterion(cfg)
    # best val top-1 so far; the running epoch's train loss sum and batch count (a stop mid-epoch
    # saves them, so the resumed epoch's record is the uninterrupted one)
    step, best, partial = 0, {"top1": -1.0, "epoch": None}, (0.0, 0)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        restore_rng(ckpt, None, cfg.seed, ctx.rank)
        step, best, partial = ckpt["step"], ckpt["best"], tuple(ckpt["partial"])
        if ctx.is_main:
            print(f"resuming {run_dir} from step {step} (epoch {step / steps_per_epoch:.2f})")
        del ckpt
    # the frozen encoder of linear mode has no gradients to average: DDP syncs the head's only
    net = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = (RunLogger(run_dir, cfg.logger, config, resume_step=step if cfg.resume else None)
              if ctx.is_main else NullLogger())
    saver = Saver(checkpoint_path(run_dir), step if cfg.resume else None, save=atomic_save)
    best_path = run_dir / "checkpoints" / "best.pt"

    def save(at: int) -> None:
        states = distributed.gather_on_main(rng_state())  # a collective: all ranks
        if ctx.is_main:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
                    "step": at, "best": best, "partial": partial, "rng": states[0], "config": config}
            if ctx.distributed:
                ckpt["rng_per_rank"] = states
            saver.checkpoint(ckpt, at)
        saver.last_saved = at

    max_steps, workers = cfg.epochs * steps_per_epoch, cfg.data.num_workers
    bar = tqdm(total=max_steps, initial=step, desc=f"{cfg.mode} {cfg.model}", dynamic_ncols=True, mininterval=1.0,
               disable=not ctx.is_main)
    record: dict = {}
    net.train()
    try:
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            start, began = step - epoch * steps_per_epoch, time.perf_counter()
            batches = EpochBatches(len(train_set), cfg.batch_size, cfg.seed, epoch, start, cfg.aug.repeats,
                                   ctx.rank, ctx.world_size)
            for images, targets in loader(train_set, batches, workers):
                images, targets = images.to(device), targets.to(device)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                scheduler.step_update(step)
                loss = loss_fn(net(images), targets)
                loss_value = distributed.mean_over_ranks(loss)  # equal shares: the global batch's loss
                if not math.isfinite(loss_value):  # the same decision on every rank
                    raise TrainingDiverged(f"loss {loss_value} at step {step + 1}: training stopped; {saver.kept()}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.clip_grad:
                    dispatch_clip_grad(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                step += 1
                if ema is not None:
                    ema.update(model, step=step)
                partial = (partial[0] + loss_value, partial[1] + 1)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.4f}",
                                lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
                # every rank stops at the same step: save() is a collective
                if step % steps_per_epoch and distributed.any_over_ranks(stops.requested is not None):
                    save(step)  # mid-epoch: the epoch's evaluation comes after the resumed rest
                    raise Stopped(stops.requested or "SIGTERM", step)
            record = {"step": step, "epoch": epoch + 1, "train_loss": partial[0] / max(partial[1], 1),
                      "lr": max(g["lr"] for g in optimizer.param_groups),
                      "images_per_s": (step - epoch * steps_per_epoch - start) * cfg.batch_size
                      / (time.perf_counter() - began)}
            partial = (0.0, 0)
            for prefix, judged in (("val", model), ("ema", ema.module if ema is not None else None)):
                if judged is not None:
                    scores = evaluate(judged, val_set, cfg.batch_size // ctx.world_size, device, workers)
                    record.update({f"{prefix}_{k}": v for k, v in scores.items()})
            if record["val_top1"] > best["top1"]:
                best = {"top1": record["val_top1"], "epoch": epoch + 1}
                if ctx.is_main:
                    saver.write({"model": model.state_dict(), "epoch": epoch + 1, "val_top1": record["val_top1"],
                                 "config": config}, best_path, f"the best weights (epoch {epoch + 1})")
            record["best_top1"] = best["top1"]
            logger.log(record)
            save(step)
            if distributed.any_over_ranks(stops.requested is not None) and epoch + 1 < cfg.epochs:
                raise Stopped(stops.requested or "SIGTERM", step)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise out_of_memory(err, cfg, saver.kept(), ctx.world_size) from None
    finally:
        bar.close()
        logger.close()
    return {"step": step, "last": record, "best": best, "run_dir": run_dir,
            "checkpoint": checkpoint_path(run_dir), "best_checkpoint": best_path, "world_size": ctx.world_size}


# absolute: run as `python -m spark_sparse.finetune`, hydra would resolve a relative path
# against that entry module's package rather than this file's
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float:
    summary = run_app(cfg, "spark_sparse.finetune", train)
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


if __name__ == "__main__":
    main()
