"""The run directory stays sound: refusals change nothing, one run at a time, a repaired metrics
log, clean stops on SIGINT/SIGTERM, exact resume after SIGKILL, damaged checkpoints, and a full
disk, a divergence or an out-of-memory reported in one line."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import spark_sparse.pretrain.app as pretrain
from spark_sparse.model.spark import SparK
from spark_sparse.run.checkpoint import load_checkpoint
from spark_sparse.run.checks import ConfigError, Refused, check_resumable
from spark_sparse.run.run_dir import RunDirLock, repair_metrics
from spark_sparse.run.signals import Stopped

from . import faults
from .runs import (ENV, PRETRAIN, ROOT, after_checkpoint, assert_one_line_error, checkpoint_step, cli_in_process,
                   error_lines, losses, pretrain_cli, pretrain_in_process, records, run_child, wait_until)
from .test_pretrain import config

CLI = [sys.executable, "-m", "spark_sparse.pretrain", *PRETRAIN]
# the command line in this process (what it says, leaves and keeps); in a process of its own
# (pretrain_cli) where only a process shows it: signals, SIGKILL, a real allocation failure
cli = pretrain_in_process


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder`` with its modification time and content hash."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir)]


# -- refusals change nothing --------------------------------------------------------------------

def test_a_refused_command_leaves_the_run_directory_exactly_as_it_found_it(tmp_path):
    run = tmp_path / "run"
    assert cli("max_steps=2", f"hydra.run.dir={run}").returncode == 0
    before = snapshot(run)
    assert ".hydra/config.yaml" in before and "pretrain.log" not in before  # nothing was logged

    assert_one_line_error(cli("max_steps=2", "mask_ratio=0.9", "resume=true", f"hydra.run.dir={run}"),
                          "different mask_ratio")
    assert snapshot(run) == before  # the config record still says what the run was trained with

    nowhere = tmp_path / "nowhere"
    assert_one_line_error(cli("max_steps=2", "resume=true", f"hydra.run.dir={nowhere}"), "no checkpoint")
    assert not nowhere.exists()


def test_a_refusal_leaves_a_directory_that_was_there_and_hydras_new_one_is_removed(tmp_path):
    there = tmp_path / "made-by-the-user"  # a job script's mkdir, or a mount point
    there.mkdir()
    assert_one_line_error(cli("mask_ratio=1.5", f"hydra.run.dir={there}"), "mask_ratio must be in [0, 1)")
    assert there.is_dir() and not any(there.iterdir())
    new = tmp_path / "new"
    assert_one_line_error(cli("mask_ratio=1.5", f"hydra.run.dir={new}"), "mask_ratio must be in [0, 1)")
    assert not new.exists()


def test_a_run_directory_that_cannot_be_one_is_refused_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("in the way")
    assert_one_line_error(cli("max_steps=1", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"),
                          f"cannot be a run directory: {tmp_path / 'afile'} is a file, not a folder")


def test_a_run_directory_under_the_home_folder_goes_there_not_into_a_folder_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    proc = cli("max_steps=1", "hydra.run.dir='~/runs/a'")  # quoted: hydra's grammar refuses a bare ~
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "home" / "runs" / "a" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "~").exists()
    # a sweep's jobs compose hydra.sweep.dir again, unexpanded: refused, naming the path to write
    assert_one_line_error(cli_in_process("spark_sparse.pretrain", "-m", *PRETRAIN, "max_steps=1,2",
                                         "hydra.sweep.dir='~/sweeps/a'"),
                          f"would be a folder named ~ in the working directory (a sweep's jobs do not expand it); "
                          f"write it in full: {tmp_path / 'home' / 'sweeps' / 'a'}")
    assert not (tmp_path / "~").exists() and not (tmp_path / "home" / "sweeps").exists()


def test_a_run_directory_the_file_system_refuses_is_one_line_too(tmp_path):
    """What no check foresees fails when the directory is made, before hydra would make it."""
    too_long = tmp_path / ("a" * 300)  # over the 255 bytes a name may have
    assert_one_line_error(cli("max_steps=1", f"hydra.run.dir={too_long}"),
                          "cannot be a run directory: File name too long")


def loading_torch(pid: int) -> bool:
    """Whether the process has begun loading torch (its libraries mapped, Linux): the app's imports,
    which a Ctrl-C ends quietly, are under way."""
    with open(f"/proc/{pid}/maps") as maps:
        return "libtorch" in maps.read()


# a user's shell starts the app with SIGINT unblocked and not ignored; a test process need not (a child
# inherits its blocked mask and ignored signals): this starts the command as the shell would
AS_FROM_A_SHELL = [sys.executable, "-c", "import os, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, "
                   "{signal.SIGINT}); signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"]


def test_a_ctrl_c_while_the_app_starts_ends_quietly(tmp_path):
    proc = subprocess.Popen([*AS_FROM_A_SHELL, *CLI, "max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # while torch loads (after a fixed 0.3 s, on a loaded CI machine, the child once ran its step and
    # exited 0 without a word of the signal: most likely sent before its exec, where it is lost)
    wait_until(lambda: loading_torch(proc.pid), proc, poll=0.01)
    with open(f"/proc/{proc.pid}/status") as status:  # what the child does with SIGINT, should it not stop
        signals = [line.strip() for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, (signals, err)
    assert not (tmp_path / "run").exists()


def test_the_resolved_config_prints_with_the_recipe_values():
    proc = cli_in_process("spark_sparse.pretrain", "model=resnet50", "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    assert "drop_path_rate: 0.05" in proc.stdout  # ${recipe:drop_path_rate} for ResNet-50


def test_a_second_run_on_a_busy_directory_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from spark_sparse.run.run_dir import RunDirLock; "
         "lock = RunDirLock(sys.argv[1]); lock.acquire(); lock.claim(); print('held', flush=True); "
         "sys.stdin.read()", str(tmp_path)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        with pytest.raises(Refused, match=rf"in use by pid {holder.pid} on "):
            pretrain.train(config("max_steps=1"), tmp_path)
        assert snapshot(tmp_path) == before
    finally:
        holder.communicate("", timeout=60)
    # the holder is gone, and so is its lock: the directory is free again
    pretrain.train(config("max_steps=1"), tmp_path)
    assert not (tmp_path / RunDirLock.HOLDER).exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a checkpoint"])
def test_resuming_a_damaged_checkpoint_is_refused_and_changes_nothing(tmp_path, damage):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    if damage == "not a checkpoint":
        torch.save(torch.zeros(3), path)
    else:
        torch.save({"model": {"w": torch.zeros(1000)}, "step": 3}, path)
        path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:300])
    before = snapshot(tmp_path)
    with pytest.raises(Refused, match=r"cannot resume: .*last.pt.* (not a readable|not a training) checkpoint") as err:
        pretrain.train(config("resume=true"), tmp_path)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


# -- metrics.jsonl --------------------------------------------------------------------------------

def test_metrics_repair_keeps_each_step_once_and_drops_a_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 1, 2, 3, 4)]  # a second attempt
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "loss": 1.0')
    note = repair_metrics(path, last_step=3)
    assert note is not None and "1 torn" in note and "1 record(s) past step 3" in note and "3 repeated" in note
    assert path.read_text().splitlines() == [json.dumps(r) for r in records[3:6]]
    assert repair_metrics(path, last_step=3) is None  # sound now: left alone


def test_resume_after_a_torn_metrics_line_logs_each_step_once(tmp_path, monkeypatch, capsys):
    after_checkpoint(monkeypatch, step=2)  # killed right after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(config("max_steps=4", "save_every=2"), tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0')  # killed mid-write of a record past the checkpoint

    pretrain.train(config("max_steps=4", "save_every=2", "resume=true"), tmp_path)
    assert steps(tmp_path) == [1, 2, 3, 4]
    assert "dropped 1 torn" in capsys.readouterr().out


def test_a_fresh_start_after_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    pretrain.train(config("max_steps=2"), tmp_path)
    assert steps(tmp_path) == [1, 2]
    assert 9.0 not in [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


# -- stops --------------------------------------------------------------------------------------

def signal_self_at(monkeypatch, call: int, times: int = 1) -> None:
    """The training forward pass number ``call`` sends SIGTERM to this process ``times`` times."""
    real_forward = SparK.forward
    calls = {"n": 0}

    def forward(self, images, active=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == call:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, images, active)

    monkeypatch.setattr(SparK, "forward", forward)


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_stops(tmp_path, monkeypatch):
    signal_self_at(monkeypatch, call=2)
    with pytest.raises(Stopped) as stop:
        pretrain.train(config("max_steps=6", "save_every=100"), tmp_path)
    assert (stop.value.signame, stop.value.step, stop.value.exit_code) == ("SIGTERM", 2, 143)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2
    assert steps(tmp_path) == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone again


def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    signal_self_at(monkeypatch, call=3, times=2)
    with pytest.raises(Stopped) as stop:
        pretrain.train(config("max_steps=6", "save_every=1"), tmp_path)
    assert stop.value.step is None
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]


def wait_for_step(run_dir: Path, above: int, proc: subprocess.Popen) -> None:
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and any(s > above for s in steps(run_dir)), proc)


def test_ctrl_c_and_sigterm_on_the_command_line_save_and_say_how_to_resume(tmp_path):
    run = tmp_path / "run"
    args = [*CLI, "max_steps=1000", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 0, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped")]
    assert len(stopped) == 1 and "resume=true" in stopped[0] and f"hydra.run.dir={run}" in stopped[0], err
    assert error_lines(err) == stopped, err  # a fresh interpreter: nothing else reached stderr (a warning)
    at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert f"stopped by SIGINT at step {at}," in stopped[0]

    leftover = run / "checkpoints" / ".last.pt.x1y2z3.tmp"  # as a kill during a save leaves it
    leftover.write_bytes(b"half a checkpoint")
    resume = stopped[0].split("continue with: ")[1].split()[3:]  # the printed command's overrides
    proc = subprocess.Popen([*CLI[:3], *resume], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(run, at, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not leftover.exists() and f"removed {leftover}" in out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] > at


def test_a_run_killed_by_sigkill_resumes_to_the_same_weights_and_optimizer_state(tmp_path):
    """SIGKILL runs no handler and no ``finally``: only the atomically written checkpoint remains.
    Drop path is on, so the global RNG must come back too, not only the mask generator."""
    run = ["max_steps=8", "save_every=2", "drop_path_rate=0.2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # three processes alike: this one's arithmetic may differ in the last bit (its threads, its BLAS)
    assert pretrain_cli(*run, f"hydra.run.dir={straight}").returncode == 0
    proc = subprocess.Popen([*CLI, *run, f"hydra.run.dir={killed}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: checkpoint_step(killed) is not None, proc)
    proc.kill()
    proc.communicate(timeout=60)
    at = checkpoint_step(killed)
    assert at < 8, "the run ended before it could be killed"
    resumed = pretrain_cli(*run, "resume=true", f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {killed} from step {at}" in resumed.stdout

    assert losses(killed) == losses(straight)  # every step, bit for bit
    want, got = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (straight, killed))
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, state in want["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(torch.as_tensor(got["optimizer"]["state"][index][key]), torch.as_tensor(tensor)), key


# -- failures while running: one line, and what was kept -----------------------------------------

@pytest.mark.parametrize("saves,kept", [
    (1, r"the last good checkpoint is .*last.pt \(step 1\); free some space and continue with resume=true"),
    (0, "no checkpoint was written; free some space and run the same command again")])
def test_a_disk_that_fills_up_while_saving_stops_the_run_keeping_the_last_good_checkpoint(
        tmp_path, monkeypatch, saves, kept):
    # the real torch.save meets the full disk: it raises a RuntimeError, the OSError is its context
    faults.fill_disk_after(saves, monkeypatch.setattr)
    step = saves + 1
    with pytest.raises(pretrain.RunFailed, match=rf"disk full while saving the step-{step} checkpoint: {kept}"):
        pretrain.train(config("max_steps=2", "save_every=1"), tmp_path)
    monkeypatch.undo()
    if saves:
        assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"] * saves  # no partial file


def test_a_full_disk_on_the_command_line_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    faults.fill_disk_after(1, monkeypatch.setattr)
    proc = cli("max_steps=3", "save_every=1", f"hydra.run.dir={run}")
    monkeypatch.undo()
    assert_one_line_error(proc, "error: disk full while saving the step-2 checkpoint: the last good checkpoint is")
    assert checkpoint_step(run) == 1


@pytest.fixture
def small_file_system(tmp_path):
    """A tmpfs of a given size in MiB, where the machine lets this process mount one."""
    mounted = []

    def mount(mib: float, options: str = "") -> Path:
        where = tmp_path / f"small{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mib * 1024)}k{options}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small file system here ({proc.stderr.strip() or 'not permitted'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_run_directory_is_refused_before_hydra_makes_anything(small_file_system):
    disk = small_file_system(1, ",ro")
    assert_one_line_error(cli("max_steps=1", f"hydra.run.dir={disk / 'run'}"),
                          f"cannot be a run directory: cannot write into {disk} (read-only or no permission)")


def test_a_disk_full_from_the_start_is_one_line(small_file_system):
    """Not even the config record fits."""
    disk = small_file_system(0.008)
    run = disk / "run"
    proc = cli("max_steps=2", f"hydra.run.dir={run}")
    assert_one_line_error(proc, "error: disk full while writing")
    assert "no checkpoint was written; free some space and run the same command again" in proc.stderr


def checkpoint_mib(*overrides: str) -> float:
    """About what a pretraining checkpoint of this config takes: weights, LAMB's two moments."""
    model = SparK.from_config(config(*overrides))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return (3 * params + buffers) / 2**20


def test_a_real_full_file_system_is_one_line_and_keeps_the_last_checkpoint(small_file_system):
    """The disk holds one checkpoint but not the temporary file of the next."""
    disk = small_file_system(int(1.6 * checkpoint_mib()) + 1)
    run = disk / "run"
    proc = cli("max_steps=3", "save_every=1", f"hydra.run.dir={run}")
    assert_one_line_error(proc, "error: disk full while saving the step-2 checkpoint: the last good checkpoint is")
    assert checkpoint_step(run) == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]


def test_a_diverging_run_stops_in_one_line_keeping_the_last_checkpoint_with_sane_weights(tmp_path):
    """An lr of 1e9 (x 4 / 256) sends the weights' norm from 109 to 3e8 at step 2 (the loss would
    follow at step 3): the step-2 weights are not saved; the step-1 checkpoint is the last good one."""
    run = tmp_path / "run"
    proc = cli("max_steps=20", "save_every=1", "optim.base_lr=1e9", f"hydra.run.dir={run}")
    assert_one_line_error(proc, "the weights at step 2 have norm")
    assert "training stopped; the last good checkpoint is" in proc.stderr and "(step 1)" in proc.stderr
    weights = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_a_fixed_key_the_checkpoint_predates_is_not_compared_and_is_named():
    """Its code had no such key; a key that it has is compared as usual."""
    now = OmegaConf.create({"model": "resnet18", "tf32": False, "optim": {"lr": 1.0, "new": 2}, "resume_changes": []})
    fixed = ("model", "tf32", "optim.new")
    assert check_resumable({"model": "resnet18", "optim": {"lr": 1.0}}, now, fixed) == ["tf32", "optim.new"]
    with pytest.raises(ConfigError, match="different model than the checkpoint's"):
        check_resumable({"model": "resnet50", "optim": {"lr": 1.0}}, now, fixed)


def test_a_diverged_run_resumes_from_its_last_good_checkpoint_with_a_deliberately_smaller_lr(tmp_path, capsys):
    with pytest.raises(pretrain.TrainingDiverged, match=r"the last good checkpoint is .*\(step 1\)"):
        pretrain.train(config("max_steps=4", "save_every=1", "optim.base_lr=1e9"), tmp_path)
    with pytest.raises(Refused, match=r"different optim .* name it in resume_changes"):  # not by accident
        pretrain.train(config("max_steps=4", "save_every=1", "resume=true"), tmp_path)
    with pytest.raises(Refused, match="resume_changes may name precision, optim.base_lr, .* not input_size"):
        pretrain.train(config("max_steps=4", "resume=true", "optim.base_lr=1e9", "resume_changes=[input_size]"),
                       tmp_path)
    summary = pretrain.train(config("max_steps=4", "save_every=1", "resume=true", "resume_changes=[optim.base_lr]"),
                             tmp_path)
    assert summary["step"] == 4 and summary["loss"] < 2
    assert "resume_changes: optim.base_lr 1000000000.0 -> 0.08 from step 1 on" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["changes"] == [{"step": 1, "key": "optim.base_lr", "from": 1e9, "to": 0.08}]
    assert ckpt["config"]["optim"]["base_lr"] == 0.08
    # the schedule is the new lr's: step 4's lr is below base_lr x 4 / 256 = 1.25e-3 (its peak)
    assert 0 < records(tmp_path)[-1]["lr"] <= 0.08 * 4 / 256


def test_resume_changes_need_a_resume(tmp_path):
    with pytest.raises(Refused, match="resume_changes names keys a resumed run changes; it needs resume=true"):
        pretrain.train(config("resume_changes=[optim.base_lr]"), tmp_path)


# the app's command line, its address space capped 1.5 GiB above what the imports took
CAPPED_CLI = """
import resource, runpy, sys
import spark_sparse.pretrain.app
peak = int(open("/proc/self/status").read().split("VmPeak:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (peak + (3 << 29),) * 2)
sys.argv = ["spark_sparse.pretrain", *sys.argv[1:]]
runpy.run_module("spark_sparse.pretrain", run_name="__main__", alter_sys=True)
"""


def test_running_out_of_memory_on_the_command_line_is_one_line_naming_the_size(tmp_path):
    """A real allocation failure: one batch of 96 images at 512 px asks for more than the 1.5 GiB
    the process may still take."""
    run = tmp_path / "run"
    proc = run_child([sys.executable, "-c", CAPPED_CLI, *PRETRAIN, "input_size=512", "batch_size=96",
                      "max_steps=2", f"hydra.run.dir={run}"])
    assert_one_line_error(proc, "error: out of memory at input_size=512, batch_size=96 (resnet18, 1 process(es))")
    assert "no checkpoint was written" in proc.stderr


def test_running_out_of_memory_names_the_size_that_was_asked_for(tmp_path, monkeypatch):
    def forward(self, images, active=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                           "memory: you tried to allocate 68719476736 bytes.\nmore detail")

    monkeypatch.setattr(SparK, "forward", forward)
    with pytest.raises(pretrain.RunFailed, match=r"out of memory at input_size=64, batch_size=4 .*"
                                                 r"you tried to allocate 68719476736 bytes\.; a smaller input_size "
                                                 r"or batch_size, or decoder\.checkpoint=true, needs less;") as err:
        pretrain.train(config(), tmp_path)
    assert "\n" not in str(err.value)
