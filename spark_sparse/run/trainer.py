"""The run skeleton both training apps share: a run's life, from an accepted command to its last save.

``launch`` owns what surrounds an app's loop, once for every app: the up-front checks, the lock
and the opening (or resumption) of the run directory, stop signals, CPU threads and seeding, and
an out-of-memory failure turned into one line. The ``Run`` it hands the app's ``fit`` owns the
rest of the bookkeeping: the device, the distributed wrap, the optimizer step with its
divergence check, the logger and progress bar, saves (a collective under torchrun), the stop
check. An app (``App``) keeps only what is its own: checks, data, model, one step, evaluation,
what it exports. The hydra entry point around ``launch`` is ``run_app`` (cli.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data.seeds import derive_seed
from . import distributed
from .checkpoint import Saver, load_checkpoint
from .failures import RunFailed, TrainingDiverged, is_out_of_memory, out_of_memory
from .logger import NullLogger, RunLogger
from .recipe import register_resolver
from .rng import restore_rng, rng_state, seed_everything
from .run_dir import RunDirLock, RunFiles, open_run_dir
from .runtime import configure_cpu
from .signals import StopSignals, Stopped


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


class App(Protocol):
    """What a training app gives the skeleton."""

    module: str  # its command line, ``python -m <module>``, for the line that resumes a stopped run
    fixed_on_resume: tuple[str, ...]  # config keys a resumed run may not change (the experiment)
    outputs: tuple[str, ...]  # files it writes atomically into the run directory besides checkpoints

    def check(self, cfg: DictConfig, world_size: int) -> None:
        """Refuse a config that cannot work, before anything is read."""

    def prepare(self, cfg: DictConfig, ctx: distributed.Context) -> None:
        """Read and build what can still be refused (data, model, pretrained weights) before the
        run directory is touched; the global RNGs are seeded with ``cfg.seed``."""

    def fit(self, run: Run) -> dict:
        """Train in ``run``; returns the summary the command line prints."""


def launch(cfg: DictConfig, run_dir: Path, app: App) -> dict:
    """Run (or resume, ``cfg.resume``) ``app`` in ``run_dir``; returns its summary. Every refusal
    comes before the run directory is touched and leaves it as it was; under torchrun rank 0
    judges the directory and every rank raises the same refusal."""
    register_resolver()  # ${recipe:KEY}: the model's recipe defaults
    ctx = distributed.init_from_env(cfg.dist_timeout_s)
    app.check(cfg, ctx.world_size)
    configure_cpu(cfg.threads)
    seed_everything(cfg.seed)  # the model's initial weights: every rank's are rank 0's
    app.prepare(cfg, ctx)
    files = RunFiles(Path(run_dir))
    lock = RunDirLock(files.root)
    with StopSignals() as stops:
        try:
            ckpt = distributed.run_on_main(lambda: open_run_dir(cfg, files, lock, app.fixed_on_resume, app.outputs))
            if cfg.resume and not ctx.is_main:
                ckpt = load_checkpoint(files.checkpoint)  # a shared run directory
            run = Run(cfg, files, ctx, ckpt, stops)
            try:
                return app.fit(run)
            except (MemoryError, RuntimeError) as err:
                if isinstance(err, RunFailed) or not is_out_of_memory(err):
                    raise
                raise out_of_memory(err, cfg, run.saver.kept(), ctx.world_size) from None
            finally:
                run.close()
        finally:
            lock.release()


class Run:
    """One accepted run, as an app's loop sees it. ``step`` counts the optimizer steps taken."""

    def __init__(self, cfg: DictConfig, files: RunFiles, ctx: distributed.Context, ckpt: dict | None,
                 stops: StopSignals) -> None:
        if ctx.rank:  # rank 0 keeps a single process's RNG streams; drop path differs per rank
            seed_everything(derive_seed("rank", cfg.seed, ctx.rank))
        self.cfg, self.files, self.ctx, self.stops = cfg, files, ctx, stops
        self.device = torch.device(cfg.device, ctx.local_rank if cfg.device == "cuda" else None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self._resumed = ckpt
        self.step = ckpt["step"] if ckpt is not None else 0
        self.saver = Saver(files.checkpoint, self.step if ckpt is not None else None)
        self.logger = (RunLogger(files, cfg.logger, self.config, resume_step=self.step if ckpt else None)
                       if ctx.is_main else NullLogger())
        self._states: dict[str, Stateful | None] = {}
        self._values: Callable[[], dict] = dict
        self._generator: torch.Generator | None = None
        self._bar: tqdm | None = None

    # -- what the run consists of -------------------------------------------------------------
    def place(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """``model`` on this process's device; with ``sync_bn`` under torchrun its batch norms take
        their statistics over every process's visible sites (after the move: the device picks
        the class)."""
        model.to(self.device)
        if self.ctx.distributed and sync_bn:
            distributed.convert_sync_batchnorm(model)
        return model

    def track(self, generator: torch.Generator | None = None, values: Callable[[], dict] = dict,
              **states: Stateful | None) -> dict:
        """What every checkpoint keeps: ``states`` under their names (None: absent), ``values()``'s
        plain entries, and ``generator`` with the global RNGs. A resumed run loads them now and
        gets the checkpoint's other entries back ({} for a fresh run)."""
        self._states, self._values, self._generator = states, values, generator
        ckpt, self._resumed = self._resumed, None
        if ckpt is None:
            return {}
        for name, state in states.items():
            if state is not None:
                state.load_state_dict(ckpt[name])
        restore_rng(ckpt, generator, self.cfg.seed, self.ctx.rank)
        if self.ctx.is_main:
            print(f"resuming {self.files.root} from step {self.step}")
        return {k: v for k, v in ckpt.items() if k not in states}

    def wrap(self, model: nn.Module, **ddp: Any) -> nn.Module:
        """``model`` as DistributedDataParallel under torchrun (``ddp``: its options), else itself."""
        if not self.ctx.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       **ddp)

    # -- one step -----------------------------------------------------------------------------
    def optimize(self, loss: Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[Tensor],
                 clip: float | None) -> tuple[float, float]:
        """Backward, the global norm clipped to ``clip`` (None: not clipped), the optimizer step;
        returns the loss averaged over processes and the gradient norm. A NaN or infinite one
        stops the run before the weights are touched (the same decision on every rank: both
        are global)."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = distributed.mean_over_ranks(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip else float("inf"))
        if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
            raise TrainingDiverged(f"loss {loss_value} / gradient norm {grad_norm.item()} at step {self.step + 1}: "
                                   f"training stopped; {self.saver.kept()}")
        optimizer.step()
        return loss_value, grad_norm.item()

    def progress(self, total: int, desc: str) -> None:
        """Show a progress bar (rank 0) up to step ``total``."""
        self._bar = tqdm(total=total, initial=self.step, desc=desc, dynamic_ncols=True, mininterval=1.0,
                         disable=not self.ctx.is_main)

    def advance(self, **shown: Any) -> int:
        """Count a step taken (and show ``shown`` beside the bar); returns the new step."""
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(**shown)
        return self.step

    # -- what the run leaves ------------------------------------------------------------------
    def log(self, record: dict) -> None:
        self.logger.log(record)

    def save(self) -> None:
        """A checkpoint of the current step (a collective: every rank calls it)."""
        states = distributed.gather_on_main(rng_state(self._generator))
        if self.ctx.is_main:
            ckpt = {name: state.state_dict() if state is not None else None for name, state in self._states.items()}
            ckpt.update(self._values(), step=self.step, rng=states[0], config=self.config)
            if self.ctx.distributed:
                ckpt["rng_per_rank"] = states
            self.saver.checkpoint(ckpt, self.step)
        self.saver.last_saved = self.step

    def write(self, make: Callable[[], object], path: Path, what: str) -> None:
        """Rank 0 writes ``make()`` to ``path`` atomically (a full disk is one line naming what was kept)."""
        if self.ctx.is_main:
            self.saver.write(make(), path, what)

    def stop_if_requested(self) -> None:
        """After a first SIGINT/SIGTERM on any rank, save the current step (unless just saved) and
        raise Stopped: every rank stops at the same step (a collective)."""
        if distributed.any_over_ranks(self.stops.requested is not None):
            if self.saver.last_saved != self.step:
                self.save()
            raise Stopped(self.stops.requested or "SIGTERM", self.step)

    def barrier(self) -> None:
        distributed.barrier()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.logger.close()
