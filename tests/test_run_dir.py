"""The run directory stays sound: refusals change nothing, one run at a time, a repaired metrics
log, clean stops on SIGINT/SIGTERM, damaged checkpoints and a full disk reported in one line."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import spark_sparse.train.pretrain as pretrain
from spark_sparse.model.spark import SparK
from spark_sparse.train.checkpoint import load_checkpoint
from spark_sparse.train.run_dir import Refused, RunDirLock, Stopped, repair_metrics

from .test_pretrain import ROOT, config

CLI = [sys.executable, "-m", "spark_sparse.pretrain", "model=resnet18", "input_size=64", "batch_size=4",
       "decoder.width=64", "vis_images=1", "threads=1", "log_every=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder`` with its modification time and content hash."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *overrides], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300, **kwargs)


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], proc.stderr


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


def test_a_second_run_on_a_busy_directory_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from spark_sparse.train.run_dir import RunDirLock; "
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
    real_save = pretrain.atomic_save

    def save_then_die(obj, path):
        real_save(obj, path)
        if isinstance(obj, dict) and obj.get("step") == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(pretrain, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(config("max_steps=4", "save_every=2"), tmp_path)
    monkeypatch.setattr(pretrain, "atomic_save", real_save)
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
    for _ in range(600):
        if (run_dir / "metrics.jsonl").exists() and any(s > above for s in steps(run_dir)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the run made no progress")


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


# -- failures while running ---------------------------------------------------------------------

def test_disk_full_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(pretrain.RunFailed,
                       match=r"disk full while saving the step-2 checkpoint: the last good checkpoint is .*last.pt \(step 1\)"):
        pretrain.train(config("max_steps=2", "save_every=1"), tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]


def test_running_out_of_memory_names_the_size_that_was_asked_for(tmp_path, monkeypatch):
    def forward(self, images, active=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                           "memory: you tried to allocate 68719476736 bytes.\nmore detail")

    monkeypatch.setattr(SparK, "forward", forward)
    with pytest.raises(pretrain.RunFailed, match=r"out of memory at input_size=64, batch_size=4 .*"
                                                 r"you tried to allocate 68719476736 bytes\.; a smaller") as err:
        pretrain.train(config(), tmp_path)
    assert "\n" not in str(err.value)
