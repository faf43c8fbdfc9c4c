"""Every key of every config group is declared with what its value must be, so a new key cannot be
forgotten by the up-front checks; each app's shipped configs pass them."""

import importlib
import re
import sys
from unittest.mock import patch

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spark_sparse.finetune.checks import KEYS as FINETUNE_KEYS
from spark_sparse.pretrain.checks import KEYS as PRETRAIN_KEYS
from spark_sparse.run.checks import ABSENT, ConfigError, get
from spark_sparse.run.cli import command_line
from spark_sparse.run.overrides import override_error
from spark_sparse.run.recipe import register_resolver
from spark_sparse.run.schema import check_keys, leaves

from .runs import ROOT

CONFIGS = [
    ("pretrain", PRETRAIN_KEYS, []),
    ("pretrain", PRETRAIN_KEYS, ["data=imagefolder", "data.root=/data", "optim=adamw", "logger=wandb"]),
    ("pretrain", PRETRAIN_KEYS, ["+experiment=paper", "data=imagefolder", "data.root=/data"]),
    ("pretrain", PRETRAIN_KEYS, ["model=convnext_atto"]),
    ("finetune", FINETUNE_KEYS, []),
    ("finetune", FINETUNE_KEYS, ["mode=linear", "logger=wandb", "model=convnext_atto"]),
    ("finetune", FINETUNE_KEYS, ["+experiment=finetune_paper", "data.train=/data/train", "data.val=/data/val"]),
]


def compose_config(name: str, overrides: list[str]):
    register_resolver()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("name,keys,overrides", CONFIGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_every_key_of_the_shipped_configs_is_declared_and_its_value_fits(name, keys, overrides):
    cfg = compose_config(name, overrides)
    undeclared = [key for key, _ in leaves(cfg, keys) if key not in keys]
    assert not undeclared
    check_keys(cfg, keys, ConfigError)


@pytest.mark.parametrize("name,keys", [("pretrain", PRETRAIN_KEYS), ("finetune", FINETUNE_KEYS)])
def test_every_declared_key_is_one_the_configs_have(name, keys):
    seen = {key for config, _, overrides in CONFIGS if config == name
            for key, _ in leaves(compose_config(name, overrides), keys)}
    assert sorted(set(keys) - seen) == []  # a stale declaration would hide a renamed key


@pytest.mark.parametrize("override,message", [
    ("drop_path_rate=2", r"drop_path_rate must be in \[0, 1\), got 2"),
    ("optim.name=foo", "optim.name must be the name of one of timm's optimizers, got 'foo'"),
    ("data.num_workers=-1", "data.num_workers must be a whole number of at least 0, got -1"),
    ("optim.clip_grad=-1", "optim.clip_grad must be positive or null, got -1"),
    ("optim.lr=0", "optim.lr must be positive or null, got 0"),
    ("mixup.prob=1.5", r"mixup.prob must be in \[0, 1\], got 1.5"),
    ("tf32=maybe", "tf32 must be true or false, got 'maybe'"),
])
def test_fine_tuning_refuses_keys_that_would_fail_or_train_nonsense(override, message):
    with pytest.raises(ConfigError, match=message):
        check_keys(compose_config("finetune", [override]), FINETUNE_KEYS, ConfigError)


@pytest.mark.parametrize("name,overrides,error", [
    ("pretrain", ["mask_ratio=0.75", "data=imagefolder", "data.root=/data", "+experiment=paper"], None),
    ("pretrain", ["hydra.run.dir=/tmp/run", "hydra/launcher=basic"], None),
    # hydra deletes what it is told to, but every run reads every key of its config (tracebacks, before)
    ("pretrain", ["~logger"], "~logger removes the logger group, which every run reads; choose one of its options "
                              "(none, wandb)"),
    ("finetune", ["~mode"], "~mode removes the mode group, which every run reads; choose one of its options "
                            "(finetune, linear)"),
    ("pretrain", ["~mask_ratio"], "~mask_ratio removes mask_ratio, which every run reads; set it instead "
                                  "(mask_ratio=...)"),
    ("pretrain", ["~optim.weight_decay"], "~optim.weight_decay removes optim.weight_decay, which every run reads; set "
                                          "it instead (optim.weight_decay=...)"),
    ("pretrain", ["-m", "mask_ratio=0.4,0.6", "~data"], "~data removes the data group, which every run reads"),
    ("pretrain", ["~mask_ratoi"], "Could not delete from config. 'mask_ratoi' does not exist."),  # hydra's words
    ("pretrain", ["--cfg", "job", "mask_ratoi=1"], None),  # hydra's flags: hydra's own handling
    ("pretrain", ["-m", "mask_ratio=0.4,0.6", "optim=lamb,adamw"], None),
    ("pretrain", ["-m", "optim=lamb,sgd"], "optim=sgd is not one of optim's options (adamw, lamb)"),  # every job
    ("pretrain", ["--multirun", "mask_ratoi=0.4,0.6"], "unknown config key mask_ratoi (did you mean mask_ratio?)"),
    # a sweep only hydra's loader lists: its key checked (as key=null), a group's left to hydra
    ("pretrain", ["-m", "model=glob(resnet1*)", "mask_ratoi=1"], "unknown config key mask_ratoi (did you mean"),
    ("pretrain", ["-m", "mask_ratoi=interval(0,1)"], "unknown config key mask_ratoi (did you mean mask_ratio?)"),
    ("pretrain", ["-m", "mask_ratio=interval(0,1)", "optim=glob(*)", "+experiment=glob(*)"], None),
    ("pretrain", ["-m", "data=imagefolder", "data.root='/a b',/c"], None),  # values that need quoting again
    ("pretrain", ["data.rot=/data"], "unknown config key data.rot (did you mean data.root, data?)"),
    ("pretrain", ["hydra.rundir=/tmp"], "unknown config key hydra.rundir: not one of hydra's settings"),
    ("pretrain", ["+experiment=imagenet"], "experiment=imagenet is not one of experiment's options (paper)"),
    ("pretrain", ["mask_ratio=[0.6"], "cannot read the override 'mask_ratio=[0.6' (no viable alternative at "),
    ("finetune", ["mode=probe"], "mode=probe is not one of mode's options (finetune, linear)"),
    # the apps share conf/: another app's option is named as such, with this app's own
    ("finetune", ["+experiment=paper"], "experiment=paper is not for finetune's config (its experiment options: "
                                        "finetune_paper)"),
    ("pretrain", ["+experiment=finetune_paper"], "experiment=finetune_paper is not for pretrain's config (its "
                                                 "experiment options: paper)"),
    ("finetune", ["+experiment=imagenet"], "experiment=imagenet is not one of experiment's options (finetune_paper)"),
    ("pretrain", ["mode=linear"], "mode=linear is not for pretrain's config (it has no mode group)"),
    ("finetune", ["data=imagefolder"], "data=imagefolder is not for finetune's config (it has no data group)"),
    ("finetune", ["experiment=finetune_paper"], "experiment is added, not chosen: write +experiment=finetune_paper"),
    ("finetune", ["+logger=wandb"], "logger is chosen, not added: write logger=wandb"),
    ("finetune", ["+experiment=finetune_paper", "model=convnext_large"], None),
    ("pretrain", ["hydra/launcher=nope"], "hydra/launcher=nope is not one of hydra/launcher's options (basic)"),
    ("finetune", ["label_smoothing=0.1"], "unknown config key label_smoothing (did you mean mixup.label_smoothing?)"),
])
def test_overrides_hydra_cannot_compose_are_said_in_one_line(name, overrides, error):
    register_resolver()
    why = override_error(str(ROOT / "conf"), name, overrides)
    assert why == error if error is None else why.startswith(error) and "\n" not in why, why


def test_every_key_of_the_speed_benchmarks_config_is_declared_and_its_value_fits():
    from benchmarks.sparse_vs_dense import KEYS, BenchConfigError

    cfg = OmegaConf.load(ROOT / "conf" / "bench" / "sparse_vs_dense.yaml")
    assert sorted(key for key, _ in leaves(cfg, KEYS)) == sorted(KEYS)  # none undeclared, none stale
    check_keys(cfg, KEYS, BenchConfigError)


def test_the_speed_benchmark_says_a_misspelt_key_in_one_line_too():
    register_resolver()
    assert override_error(str(ROOT / "conf" / "bench"), "sparse_vs_dense", ["modles=[resnet18]"]) == \
        "unknown config key modles (did you mean models?)"


HELP_TOKEN = re.compile(r"(?<![\w.=-])(\+?[a-z_]+(?:\.[a-z_]+)*)=([^\s()]+)")
PLACEHOLDERS = {"DIR", "N", "RUN_DIR", "...", "SWEEP_DIR"}


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_help_is_short_and_names_only_groups_options_keys_and_defaults_the_app_has(name, capsys):
    """hydra's default help listed every app's groups and dumped the recipe table (580 lines)."""
    main = importlib.import_module(f"spark_sparse.{name}.app").main
    with pytest.raises(SystemExit) as stop, patch.object(sys, "argv", [name, "--help"]):
        command_line(main, name)
    assert stop.value.code in (0, None)
    text = capsys.readouterr().out
    assert 15 < len(text.splitlines()) < 45, text
    defaults = OmegaConf.to_container(compose_config(name, []), resolve=False)
    wandb = OmegaConf.to_container(compose_config(name, ["logger=wandb"]), resolve=False)
    checked = 0
    for key, value in HELP_TOKEN.findall(text):
        if key in ("group", "key"):  # the usage line's
            continue
        value = value.rstrip(",;")
        group = key.lstrip("+")
        if (ROOT / "conf" / group).is_dir():  # group=option|option
            assert all((ROOT / "conf" / group / f"{option}.yaml").is_file() for option in value.split("|")), key
        elif not key.startswith("hydra."):
            config = wandb if key.startswith("logger.") else defaults
            assert get(config, key, ABSENT) is not ABSENT, key
            shown = value.split("|")[0]
            if shown not in PLACEHOLDERS and "|" not in value and not str(get(config, key)).startswith("${"):
                assert str(get(config, key)) == shown or get(config, key) == yaml.safe_load(shown), (key, value)
        checked += 1
    assert checked >= 12
