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

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data.seeds import derive_seed
from ..precision import autocast, needs_grad_scaler
from . import distributed
from .checkpoint import Saver, load_checkpoint
from .checks import adopt_former_defaults
from .checks import get as _get
from .failures import RunFailed, TrainingDiverged, is_disk_full, is_out_of_memory, out_of_memory
from .logger import NullLogger, RunLogger
from .profiling import StepProfiler
from .recipe import register_resolver
from .rng import restore_rng, rng_state, seed_everything
from .run_dir import RunDirLock, RunFiles, RunRules, open_run_dir
from .runtime import configure_cpu, configure_cuda
from .signals import StopSignals, Stopped


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


class App(RunRules, Protocol):
    """What a training app gives the skeleton: its rules for its run directory (``RunRules``), and:"""

    memory_savers: str  # what its out-of-memory line says needs less (failures.LESS_MEMORY and its own)

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
    judges the directory and every rank raises the same refusal. A full disk or an exhausted
    memory ends the run in one line naming what was kept."""
    register_resolver()  # ${recipe:KEY}: the model's recipe defaults
    ctx = distributed.init_from_env(cfg.dist_timeout_s)
    app.check(cfg, ctx.world_size)
    configure_cpu(cfg.threads)
    seed_everything(cfg.seed)  # the model's initial weights: every rank's are rank 0's
    app.prepare(cfg, ctx)
    files = RunFiles(Path(run_dir))
    lock = RunDirLock(files.root)
    run: Run | None = None
    with StopSignals() as stops:
        try:
            ckpt = distributed.run_on_main(lambda: open_run_dir(cfg, files, lock, app))
            if cfg.resume and not ctx.is_main:
                ckpt = load_checkpoint(files.checkpoint)  # a shared run directory
                adopt_former_defaults(ckpt["config"], cfg, app.former_defaults)
            run = Run(cfg, files, ctx, ckpt, stops, app.module)
            try:
                return app.fit(run)
            finally:
                run.close()
        except (MemoryError, RuntimeError, OSError) as err:
            failure = _failure(err, cfg, files, run, ctx.world_size, app.memory_savers)
            if failure is err:
                raise
            raise failure from None
        finally:
            lock.release()


def _failure(err: BaseException, cfg: DictConfig, files: RunFiles, run: Run | None, processes: int,
             memory_savers: str) -> BaseException:
    """The one-line failure a full disk or an exhausted memory becomes; any other error as it is."""
    if isinstance(err, (RunFailed, TrainingDiverged)):
        return err
    if run is not None:
        kept, then = run.saver.kept(), run.saver.then()
    elif cfg.resume:
        kept, then = f"the checkpoint {files.checkpoint} is kept", "continue with resume=true"
    else:
        kept, then = "no checkpoint was written", "run the same command again"
    if is_disk_full(err):
        return RunFailed(f"disk full while writing {getattr(err, 'filename', None) or 'the run directory'}: {kept}; "
                         f"free some space and {then}")
    if is_out_of_memory(err):
        return out_of_memory(err, cfg, kept, processes, memory_savers)
    return err


class Run:
    """One accepted run, as an app's loop sees it. ``step`` counts the optimizer steps taken.

    A run diverges when its loss or gradient norm is not finite, or when its loss or its weights'
    norm grows past ``LIMIT`` times where the run started: it stops before those weights are
    saved, so the checkpoint it names holds weights that gave a sane loss.
    """

    LIMIT = 100.0

    def __init__(self, cfg: DictConfig, files: RunFiles, ctx: distributed.Context, ckpt: dict | None,
                 stops: StopSignals, module: str = "") -> None:
        if ctx.rank:  # rank 0 keeps a single process's RNG streams; drop path differs per rank
            seed_everything(derive_seed("rank", cfg.seed, ctx.rank))
        self.cfg, self.files, self.ctx, self.stops, self.module = cfg, files, ctx, stops, module
        self.device = torch.device(cfg.device, ctx.local_rank if cfg.device == "cuda" else None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            configure_cuda(cfg.tf32)
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
        self._model: nn.Module | None = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(cfg.precision))
        # rank 0's steps, profiled as they run (profile.steps; 0: off), counted from where this process starts
        self.profiler = StepProfiler(cfg.profile.start, cfg.profile.steps if ctx.is_main else 0, self.device,
                                     files.profile, first=self.step)
        # the run's first loss and weight norm (kept across resumes), and the deliberate changes
        # of resumes (resume_changes) with the step they were made at
        self._reference: dict[str, float] = dict(ckpt.get("reference", {})) if ckpt else {}
        self._changes: list[dict] = list(ckpt.get("changes", [])) if ckpt else []
        if ckpt is not None and cfg.get("resume_changes"):
            saved = ckpt["config"]
            self._changes += [{"step": self.step, "key": key, "from": _get(saved, key), "to": _get(self.config, key)}
                              for key in cfg.resume_changes]

    # -- what the run consists of -------------------------------------------------------------
    def place(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """``model`` on this process's device; with ``sync_bn`` under torchrun its batch norms take
        their statistics over every process's visible sites (after the move: the device picks
        the class)."""
        model.to(self.device)
        if self.ctx.distributed and sync_bn:
            distributed.convert_sync_batchnorm(model)
        self._model = model
        if "weight_norm" not in self._reference:
            self._check_weights()  # notes the norm the run starts from
        return model

    def track(self, generator: torch.Generator | None = None, values: Callable[[], dict] = dict,
              **states: Stateful | None) -> dict:
        """What every checkpoint keeps: ``states`` under their names (None: absent), ``values()``'s
        plain entries, and ``generator`` with the global RNGs. A resumed run loads them now and
        gets the checkpoint's other entries back ({} for a fresh run)."""
        states = {**states, "scaler": self.scaler}  # fp16's loss scale goes with the run
        self._states, self._values, self._generator = states, values, generator
        ckpt, self._resumed = self._resumed, None
        if ckpt is None:
            return {}
        # a resume that changes the optimisation (resume_changes) keeps the schedule as the new
        # config builds it: a schedule is a function of the step
        rebuilt = {"scheduler"} if any(k.startswith("optim.") for k in self.cfg.get("resume_changes", [])) else set()
        for name, state in states.items():
            if state is not None and name not in rebuilt and ckpt.get(name):  # {}: a disabled scaler's
                state.load_state_dict(ckpt[name])
        restore_rng(ckpt, generator, self.cfg.seed, self.ctx.rank)
        if self.ctx.is_main:
            print(f"resuming {self.files.root} from step {self.step}")
        return {k: v for k, v in ckpt.items() if k not in states}

    def wrap(self, model: nn.Module, replayed: bool = False, **ddp: Any) -> nn.Module:
        """``model`` as DistributedDataParallel under torchrun (``ddp``: its options), else itself.
        ``replayed``: its steps are replayed from CUDA graphs, whose backward DDP's hooks cannot
        follow: the model itself, with rank 0's weights on every rank, and its gradients averaged
        after each step by ``average_gradients``."""
        if not self.ctx.distributed:
            return model
        if replayed:
            distributed.broadcast_parameters(model)
            return model
        # no device_ids: DDP would then copy every input to the GPU, the mask included, which the
        # sparse engine reads on the CPU (the apps move their images themselves)
        return DistributedDataParallel(model, **ddp)

    # -- one step -----------------------------------------------------------------------------
    def average_gradients(self, parameters: Iterable[Tensor]) -> None:
        """Each gradient's mean over the processes, for a model ``wrap``ped with ``replayed``
        (DistributedDataParallel averages its own during backward); nothing in one process."""
        distributed.average_gradients(parameters)

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        """The context of a forward pass in the run's ``precision`` (bf16, fp16: torch.autocast;
        the weights stay float32, and so do their gradients and the optimizer's state);
        ``cache=False`` inside a CUDA graph."""
        return autocast(self.cfg.precision, self.device.type, cache)

    def optimize(self, loss: Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[Tensor],
                 clip: float | None) -> tuple[float, float]:
        """``backward`` then ``update``: returns the loss averaged over processes and the gradient norm."""
        self.backward(loss, optimizer)
        return self.update(loss, optimizer, parameters, clip)

    def backward(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Gradients of ``loss`` (scaled for fp16), the last ones cleared; on a GPU only queued:
        the CPU is free for the next step's preparations until ``update`` reads the loss."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def update(self, loss: Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[Tensor],
               clip: float | None) -> tuple[float, float]:
        """The global gradient norm clipped to ``clip`` (None: not clipped), then the optimizer
        step; returns the loss averaged over processes and the gradient norm, read in one wait
        for the GPU once the update is queued (on a GPU the CPU queues it while the GPU still runs
        the backward, instead of the GPU idling while it is queued). A NaN or infinite one stops
        the run before the weights it made are saved (the same decision on every rank: both are
        global), except fp16's overflowing gradients: the loss scaler skipped that step."""
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip else float("inf"))
        read = torch.stack([distributed.averaged_over_ranks(loss), grad_norm.double()])
        self.scaler.step(optimizer)  # skipped after an fp16 overflow, which lowers the scale
        self.scaler.update()
        loss_value, grad_norm = read.tolist()
        overflow = self.scaler.is_enabled() and not math.isfinite(grad_norm)
        if not (math.isfinite(loss_value) and (math.isfinite(grad_norm) or overflow)):
            self._diverged(f"loss {loss_value} / gradient norm {grad_norm} at step {self.step + 1}")
        first = self._reference.setdefault("loss", loss_value)
        if loss_value > self.LIMIT * max(first, 1.0):
            self._diverged(f"loss {loss_value:.4g} at step {self.step + 1}, over {self.LIMIT:.0f} times the run's "
                           f"first ({first:.4g})")
        return loss_value, grad_norm

    def _diverged(self, what: str) -> None:
        raise TrainingDiverged(f"{what}: training stopped; {self.saver.kept()}")

    def _check_weights(self) -> None:
        """Refuse to save weights that are not finite or have grown past LIMIT times their norm at
        the run's start (the lr was far too large: the next loss would be absurd)."""
        if self._model is None:
            return
        norm = torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in self._model.parameters()]))
        norm = norm.item()
        start = self._reference.setdefault("weight_norm", norm)
        if not math.isfinite(norm) or norm > self.LIMIT * start:
            self._diverged(f"the weights at step {self.step} have norm {norm:.4g}, {norm / start:.3g} times "
                           f"the run's start ({start:.4g})")

    def progress(self, total: int, desc: str) -> None:
        """Show a progress bar (rank 0) up to step ``total``."""
        self._bar = tqdm(total=total, initial=self.step, desc=desc, dynamic_ncols=True, mininterval=1.0,
                         disable=not self.ctx.is_main)

    def advance(self, **shown: Any) -> int:
        """Count a step taken (and show ``shown`` beside the bar); returns the new step."""
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            # shown at the bar's next refresh (at most once a second): not a line a step in a log file
            self._bar.set_postfix(refresh=False, **shown)
        self._profiled(self.profiler.after_step(self.step))
        return self.step

    def _profiled(self, summary: dict | None) -> None:
        if summary is not None:
            tqdm.write(StepProfiler.line(summary, self.files.profile))

    # -- what the run leaves ------------------------------------------------------------------
    def log(self, record: dict) -> None:
        self.logger.log(record)

    def save(self) -> None:
        """A checkpoint of the current step (a collective: every rank calls it); weights that have
        diverged are not saved: the run stops, keeping the previous checkpoint."""
        self._check_weights()  # the same decision on every rank: DDP keeps the weights equal
        states = distributed.gather_on_main(rng_state(self._generator))
        if self.ctx.is_main:
            ckpt = {name: state.state_dict() if state is not None else None for name, state in self._states.items()}
            ckpt.update(self._values(), step=self.step, rng=states[0], config=self.config,
                        reference=self._reference, changes=self._changes, app=self.module)
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
        try:  # a run that ended inside the window keeps what was profiled
            self._profiled(self.profiler.finish(self.step))
        except (RuntimeError, OSError) as err:  # a failed run's profile must not hide why it failed
            warnings.warn(f"the profiled steps were not written: {err}", stacklevel=2)
        if self._bar is not None:
            self._bar.close()
        self.logger.close()
