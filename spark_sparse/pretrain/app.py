"""SparK pretraining, driven by hydra: ``python -m spark_sparse.pretrain key=value ...``.

The run directory (hydra.run.dir) receives metrics.jsonl, checkpoints/last.pt (everything needed
to resume), encoder_timm.pth (the encoder alone, as a timm state dict) and reconstruction PNGs.

Data-parallel on several processes or machines: ``torchrun --nproc_per_node=N -m
spark_sparse.pretrain ...`` (DistributedDataParallel; batch_size stays the global batch, and the
run matches a single process with that batch). Rank 0 alone writes to the run directory. The
run's life (directory, resume, signals, saves) is the shared skeleton's (spark_sparse/run/).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from ..data.seeds import derive_seed
from ..model.graphed import GraphedStep
from ..model.spark import MaskPlan, SparK
from ..run import distributed
from ..run.checks import ConfigError
from ..run.cli import run_app
from ..run.failures import LESS_MEMORY, RunFailed, TrainingDiverged
from ..run.recipe import CONF_DIR
from ..run.run_dir import RunFiles
from ..run.trainer import Run, launch
from .checks import CHANGEABLE_ON_RESUME, FIXED_ON_RESUME, FORMER_DEFAULTS, validate
from .data import build_dataset, build_loader
from .optim import build_optimizer, build_scheduler, set_weight_decay, weight_decay_at
from .visualize import save_reconstruction

__all__ = ["ConfigError", "Pretraining", "RunFailed", "TrainingDiverged", "main", "plan", "train"]


def plan(cfg: DictConfig, num_images: int) -> tuple[int, int]:
    """(max_steps, warmup_steps); warmup is capped at a quarter of the run for short runs."""
    steps_per_epoch = num_images / cfg.batch_size
    max_steps = cfg.max_steps if cfg.epochs is None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = min(round(cfg.optim.warmup_epochs * steps_per_epoch), max_steps // 4)
    return max_steps, warmup


class Batch(NamedTuple):
    """One step's share of the global batch, ready for the model."""

    images: Tensor  # on the run's device (on a GPU, perhaps still being copied there)
    plan: MaskPlan  # its mask and what the mask decides (SparK.plan)


class Pretraining:
    """SparK pretraining as the run skeleton runs it: data, model, one step, pictures, export."""

    module = "spark_sparse.pretrain"
    fixed_on_resume = FIXED_ON_RESUME
    changeable_on_resume = CHANGEABLE_ON_RESUME
    former_defaults = FORMER_DEFAULTS
    outputs = (RunFiles.ENCODER,)
    memory_savers = f"{LESS_MEMORY}, or decoder.checkpoint=true,"

    def check(self, cfg: DictConfig, world_size: int) -> None:
        validate(cfg, world_size)

    def prepare(self, cfg: DictConfig, ctx: distributed.Context) -> None:
        # every rank lists the data and decodes a first image: bad data stops all ranks alike
        self.dataset = build_dataset(cfg.data.kind, cfg.input_size, root=cfg.data.root, scale=tuple(cfg.data.scale))
        self.dataset.check_readable()
        self.model = SparK.from_config(cfg)

    def fit(self, run: Run) -> dict:
        cfg = run.cfg
        model = run.place(self.model, sync_bn=cfg.sync_bn)
        max_steps, warmup = plan(cfg, len(self.dataset))
        optimizer = build_optimizer(model, cfg.optim, cfg.batch_size)
        scheduler = build_scheduler(optimizer, cfg.optim, max_steps, warmup)
        resumed = run.track(model=model, optimizer=optimizer, scheduler=scheduler,
                            values=lambda: {"max_steps": max_steps, "loss": loss})
        loss = resumed.get("loss", float("nan"))  # the last step's, until this run takes one
        if run.step >= max_steps and run.ctx.is_main:
            print(f"note: {run.files.root} had finished ({run.step} of {max_steps} steps): nothing left to train")
        # synchronised norms keep identical running statistics on all ranks: no broadcast needed
        net = run.wrap(model, replayed=cfg.cuda_graph, broadcast_buffers=not cfg.sync_bn)
        self.graphed: GraphedStep | None = None  # cuda_graph: captured on this run's first step
        pictures = self.pictures(run, model)
        loader = build_loader(self.dataset, cfg.batch_size, cfg.seed, start_step=run.step, max_steps=max_steps,
                              num_workers=cfg.data.num_workers, rank=run.ctx.rank, world_size=run.ctx.world_size,
                              pin_memory=run.device.type == "cuda")
        run.progress(max_steps, f"SparK {cfg.model}")
        net.train()
        batches = iter(loader)
        batch = self.next_batch(run, model, batches, run.step, like=None)
        while batch is not None:
            loss, batch = self.step(run, net, model, optimizer, scheduler, batch, batches, max_steps)
            if run.step == max_steps:
                break
            run.stop_if_requested()
            if run.step % cfg.save_every == 0:
                run.save()
            if run.step % cfg.vis_every == 0:
                pictures(run.step)
        run.save()
        export = run.files.encoder
        run.write(model.encoder.timm_state_dict, export, "the timm encoder")
        picture = pictures(run.step)
        run.barrier()  # every rank returns once the outputs exist
        return {"step": run.step, "loss": loss, "run_dir": run.files.root, "checkpoint": run.files.checkpoint,
                "encoder": export, "picture": picture, "world_size": run.ctx.world_size}

    def next_batch(self, run: Run, model: SparK, batches: Iterator[Tensor], step: int,
                   like: MaskPlan | None) -> Batch | None:
        """The batch of optimizer step ``step`` (counted from 0): its images on their way to the
        device and its mask's plan (``like``: the previous batch's, whose tables it builds too);
        None after the last. A mask is a function of the seed and the step, as the images are,
        so a resumed run masks what an uninterrupted one would, however far ahead it plans."""
        images = next(batches, None)
        if images is None:
            return None
        images = images.to(run.device, non_blocking=True)
        generator = torch.Generator().manual_seed(derive_seed("mask", run.cfg.seed, step))
        # equal hidden counts per image: the mean of the ranks' losses is the global loss, and
        # DDP's averaged gradients are its gradients
        active = model.random_mask(images, run.ctx.rank, run.ctx.world_size, generator)
        return Batch(images, model.plan(active, run.device, like))

    def step(self, run: Run, net, model: SparK, optimizer, scheduler, batch: Batch, batches: Iterator[Tensor],
             max_steps: int) -> tuple[float, Batch | None]:
        """One optimizer step on ``batch`` (this process's share of the global batch); returns its
        loss and the next step's batch, made while the GPU runs this one: on a GPU the loss is
        read (a wait) only once the next images are loaded and their mask's tables built."""
        cfg, start = run.cfg, time.perf_counter()
        scheduler.step_update(run.step)
        wd = weight_decay_at(run.step, max_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
        set_weight_decay(optimizer, wd)
        if cfg.cuda_graph:
            loss = self.replayed(run, net, batch)
        else:
            with run.autocast():
                loss = net(batch.images, batch.plan)["loss"]
            run.backward(loss, optimizer)
        upcoming = self.next_batch(run, model, batches, run.step + 1, like=batch.plan)
        loss, grad_norm = run.update(loss, optimizer, model.parameters(), cfg.optim.clip_grad)
        images_per_s = batch.images.shape[0] * run.ctx.world_size / (time.perf_counter() - start)
        lr = optimizer.param_groups[0]["lr"]
        step = run.advance(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        if step % cfg.log_every == 0 or step == max_steps:
            run.log({"step": step, "loss": loss, "lr": lr, "weight_decay": wd, "grad_norm": grad_norm,
                     "images_per_s": images_per_s, "epoch": step * cfg.batch_size / len(self.dataset)})
        return loss, upcoming

    def replayed(self, run: Run, model: SparK, batch: Batch) -> Tensor:
        """Forward and backward of ``batch`` replayed from a CUDA graph of the run's first batch
        (``cuda_graph``): the gradients are overwritten in place, never cleared; under torchrun
        then averaged over the processes."""
        if self.graphed is None:
            def loss_of(images: Tensor, plan: MaskPlan) -> Tensor:
                with run.autocast(cache=False):
                    return model(images, plan)["loss"]

            self.graphed = GraphedStep(model, loss_of, batch.images, batch.plan)
        loss = self.graphed(batch.images, batch.plan)
        run.average_gradients(model.parameters())
        return loss

    def pictures(self, run: Run, model: SparK):
        """A function drawing the reconstruction picture of a step (rank 0; eval mode: the norms
        use running statistics, no collective) and returning its path."""
        cfg = run.cfg
        plain = self.dataset.plain()
        count = min(cfg.vis_images, len(plain)) if run.ctx.is_main else 0
        batch = torch.stack([plain[(i, 0)] for i in range(count)]).to(run.device) if count else None

        def draw(step: int) -> Path:
            path = run.files.root / f"reconstruction_step{step:06d}.png"
            if batch is not None:
                save_reconstruction(model, batch, path, seed=cfg.seed,
                                    title=f"{cfg.model}, mask {cfg.mask_ratio}, step {step}")
                run.logger.log_image(path, step)
            return path

        return draw


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) one pretraining; returns a summary with the final loss and output paths.
    A first SIGINT/SIGTERM saves a checkpoint after the current step and raises Stopped."""
    return launch(cfg, run_dir, Pretraining())


@hydra.main(config_path=CONF_DIR, config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> float:
    summary = run_app(cfg, Pretraining.module, train)
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
