"""SparK pretraining, driven by hydra: ``python -m spark_sparse.pretrain key=value ...``.

The run directory (hydra.run.dir) receives metrics.jsonl, checkpoints/last.pt (everything needed
to resume), encoder_timm.pth (the encoder alone, as a timm state dict) and reconstruction PNGs.

Data-parallel on several processes or machines: ``torchrun --nproc_per_node=N -m
spark_sparse.pretrain ...`` (DistributedDataParallel; batch_size stays the global batch, and the
run matches a single process with that batch). Rank 0 alone writes to the run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..model.spark import SparK
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
from .data import PretrainDataset, build_dataset, build_loader
from .optim import build_optimizer, build_scheduler, set_weight_decay, weight_decay_at
from .visualize import save_reconstruction

__all__ = ["ConfigError", "RunFailed", "TrainingDiverged", "main", "plan", "train", "validate"]


def plan(cfg: DictConfig, num_images: int) -> tuple[int, int]:
    """(max_steps, warmup_steps); warmup is capped at a quarter of the run for short runs."""
    steps_per_epoch = num_images / cfg.batch_size
    max_steps = cfg.max_steps if cfg.epochs is None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = min(round(cfg.optim.warmup_epochs * steps_per_epoch), max_steps // 4)
    return max_steps, warmup


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) one pretraining; returns a summary with the final loss and output paths.

    Under torchrun each process trains on its slice of every global batch; the model is wrapped
    in DistributedDataParallel and (with sync_bn) its batch norms see the whole global batch.
    A first SIGINT/SIGTERM saves a checkpoint after the current step and raises Stopped.
    """
    register_resolver()  # ${recipe:KEY}: the model's SparK recipe defaults
    ctx = distributed.init_from_env(cfg.dist_timeout_s)
    validate(cfg, ctx.world_size)
    run_dir = Path(run_dir)
    # every rank lists the data and decodes a first image: bad data stops all ranks alike, and
    # before the run directory is touched
    dataset = build_dataset(cfg.data.kind, cfg.input_size, root=cfg.data.root, scale=tuple(cfg.data.scale))
    dataset.check_readable()
    lock = RunDirLock(run_dir)
    with StopSignals() as stops:
        try:
            # rank 0 judges the run directory; a refusal stops every rank with the same error
            ckpt = distributed.run_on_main(
                lambda: open_run_dir(cfg, run_dir, lock, FIXED_ON_RESUME, ["encoder_timm.pth"]))
            if cfg.resume and not ctx.is_main:
                ckpt = load_checkpoint(checkpoint_path(run_dir))  # a shared run directory
            return _fit(cfg, run_dir, ctx, dataset, ckpt, stops)
        finally:
            lock.release()


def _fit(cfg: DictConfig, run_dir: Path, ctx: distributed.Context, dataset: PretrainDataset,
         ckpt: dict | None, stops: StopSignals) -> dict:
    ckpt_path = checkpoint_path(run_dir)
    configure_cpu(cfg.threads)
    # per-rank global RNGs (drop-path differs between ranks); the model's initial weights are
    # rank 0's anyway: DistributedDataParallel broadcasts them
    seed_everything(cfg.seed + ctx.rank)
    device = torch.device(cfg.device, ctx.local_rank if cfg.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    max_steps, warmup = plan(cfg, len(dataset))
    model = SparK.from_config(cfg).to(device)
    if ctx.distributed and cfg.sync_bn:
        distributed.convert_sync_batchnorm(model)  # after .to(): the device picks the norm class
    optimizer = build_optimizer(model, cfg.optim, cfg.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps, warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # ME is float32-only: no fp16

    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, model.generator, cfg.seed, ctx.rank)
        step = ckpt["step"]
        if ctx.is_main:
            print(f"resuming {run_dir} from step {step}")
        del ckpt
    # every parameter takes part in every step (the mask tokens too, through torch.where), so
    # DDP needs no search for unused parameters; synchronised norms keep identical running
    # statistics on all ranks, so only unsynchronised ones need rank 0's broadcast
    net = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=not cfg.sync_bn)
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = (RunLogger(run_dir, cfg.logger, config, resume_step=step if cfg.resume else None)
              if ctx.is_main else NullLogger())
    saver = Saver(checkpoint_path(run_dir), step if cfg.resume else None, save=atomic_save)

    def save(at: int) -> None:
        states = distributed.gather_on_main(rng_state(model.generator))  # a collective: all ranks
        if ctx.is_main:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "step": at, "max_steps": max_steps, "rng": states[0], "config": config}
            if ctx.distributed:
                ckpt["rng_per_rank"] = states
            saver.checkpoint(ckpt, at)
        saver.last_saved = at

    def picture(at: int) -> Path:
        path = run_dir / f"reconstruction_step{at:06d}.png"
        if ctx.is_main:  # eval mode: the norms use running statistics, no collective
            save_reconstruction(model, vis_batch, path, seed=cfg.seed,
                                title=f"{cfg.model}, mask {cfg.mask_ratio}, step {at}")
            logger.log_image(path, at)
        return path

    loader = build_loader(dataset, cfg.batch_size, cfg.seed, start_step=step, max_steps=max_steps,
                          num_workers=cfg.data.num_workers, rank=ctx.rank, world_size=ctx.world_size)
    bar = tqdm(total=max_steps, initial=step, desc=f"SparK {cfg.model}", dynamic_ncols=True,
               mininterval=1.0, disable=not ctx.is_main)
    loss_value, pic = float("nan"), None
    export = run_dir / "encoder_timm.pth"
    net.train()
    try:
        if ctx.is_main:
            plain = PretrainDataset(dataset.paths, cfg.input_size, augment=False)
            vis_batch = torch.stack([plain[(i, 0)] for i in range(min(cfg.vis_images, len(plain)))]).to(device)
        for images in loader:
            start = time.perf_counter()
            images = images.to(device, non_blocking=True)
            scheduler.step_update(step)
            wd = weight_decay_at(step, max_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
            set_weight_decay(optimizer, wd)
            active = model.random_mask(images, ctx.rank, ctx.world_size)
            # equal hidden counts per image: the mean of the ranks' losses is the global loss,
            # and DDP's averaged gradients are its gradients
            loss = net(images, active)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = distributed.mean_over_ranks(loss)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.optim.clip_grad if cfg.optim.clip_grad else float("inf"))
            # global loss and all-reduced gradients: every rank takes the same decision
            if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
                raise TrainingDiverged(
                    f"loss {loss_value} / gradient norm {grad_norm.item()} at step {step + 1}: training "
                    f"stopped; {saver.kept()}")
            optimizer.step()
            step += 1
            ips = images.shape[0] * ctx.world_size / (time.perf_counter() - start)
            lr = optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            if step % cfg.log_every == 0 or step == max_steps:
                logger.log({"step": step, "loss": loss_value, "lr": lr, "weight_decay": wd,
                            "grad_norm": grad_norm.item(), "images_per_s": ips,
                            "epoch": step * cfg.batch_size / len(dataset)})
            # every rank stops at the same step: save() is a collective
            if distributed.any_over_ranks(stops.requested is not None) and step < max_steps:
                if saver.last_saved != step:
                    save(step)
                raise Stopped(stops.requested or "SIGTERM", step)
            if step % cfg.save_every == 0 and step < max_steps:
                save(step)
            if step % cfg.vis_every == 0 and step < max_steps:
                picture(step)
        save(step)
        if ctx.is_main:
            saver.write(model.encoder.timm_state_dict(), export, "the timm encoder")
        pic = picture(step)
        distributed.barrier()  # every rank returns once the outputs exist
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise out_of_memory(err, cfg, saver.kept(), ctx.world_size) from None
    finally:
        bar.close()
        logger.close()
    return {"step": step, "loss": loss_value, "run_dir": run_dir, "checkpoint": ckpt_path,
            "encoder": export, "picture": pic, "world_size": ctx.world_size}


# absolute: run as `python -m spark_sparse.pretrain`, hydra would resolve a relative path
# against that entry module's package rather than this file's
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> float:
    summary = run_app(cfg, "spark_sparse.pretrain", train)
    if summary is None:  # not rank 0
        return float("nan")
    world_size = summary["world_size"]
    print(f"done: {summary['step']} steps, final loss {summary['loss']:.4f}"
          + (f" ({world_size} processes)" if world_size > 1 else "") + "\n"
          f"  run directory:  {summary['run_dir']}\n"
          f"  checkpoint:     {summary['checkpoint']}\n"
          f"  timm encoder:   {summary['encoder']}  "
          f"(timm.create_model('{cfg.model}', num_classes=0).load_state_dict(torch.load(...)))\n"
          f"  reconstruction: {summary['picture']}")
    return summary["loss"]


if __name__ == "__main__":
    main()
