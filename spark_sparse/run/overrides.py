"""A command line's overrides that hydra cannot compose, said in one line before hydra starts.

Hydra reports them in several lines, some misleading here: a misspelt key gets "To append to your
config use +key=value", which the app then refuses as an unknown key anyway. ``override_error``
composes the config once with hydra's own compose API (about 0.15 s) and words what went wrong
as the apps word their refusals, suggesting the keys a misspelt one may have meant. The apps share
conf/: an option of another app's (pretraining's experiment=paper given to fine-tuning) is named
as such, with this app's own options."""

from __future__ import annotations

import difflib
import os
import re

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .failures import first_line

_NOT_OVERRIDABLE = re.compile(r"Could not override '([^']+)'")
_NOT_FOUND = re.compile(r"Could not find '([^']+)'")
_SWEEP = re.compile(r"Ambiguous value for argument '([^']+)'")


def _keys(cfg: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a plain config, groups and leaves."""
    keys = []
    for key, value in cfg.items():
        keys.append(prefix + str(key))
        if isinstance(value, dict):
            keys += _keys(value, f"{prefix}{key}.")
    return keys


def _options(message: str) -> list[str]:
    """The options hydra lists after "Available options in 'group':", one per tab-indented line."""
    after = message.split("Available options", 1)[-1].split("Config search path", 1)[0]
    return [line.strip() for line in after.splitlines()[1:] if line.startswith("\t")]


def _parse_error(parser: OverridesParser, arg: str) -> str | None:
    """Why hydra's grammar refuses the override ``arg`` (its message's own line), None if it reads."""
    try:
        parser.parse_override(arg)
    except HydraException as err:  # OverrideParseException for a list of them, its base for one
        return next((r for r in str(err).split("\n") if r and not r.startswith(("Error parsing", "See "))), "")
    return None


def _unreadable(args: list[str]) -> str:
    parser = OverridesParser.create()
    for arg in args:
        if (detail := _parse_error(parser, arg)) is not None:
            return f"cannot read the override {arg!r} ({detail}); overrides are key=value, +key=value or ~key"
    return "cannot read the overrides"


def _groups(config_dir: str, config_name: str) -> set[str]:
    """The config groups: those the config chooses from (hydra's own too) and conf/'s folders."""
    base = _composed(config_dir, config_name, [])
    folders = {os.path.relpath(d, config_dir) for d, _, files in os.walk(config_dir) if d != config_dir
               and any(f.endswith(".yaml") for f in files)}
    return folders | (set() if base is None else set(base.hydra.runtime.choices))


def _choices(arg: str, override, groups: set[str]) -> list[str]:
    """What a multirun's jobs take of one override: the override itself, or each value of its
    sweep; for a sweep only hydra's loader lists (glob, interval) ``key=null``, so that its key is
    still checked, or nothing where it runs over a config group's options (``groups``)."""
    if not override.is_sweep_override():
        return [arg]
    key = override.get_key_element()
    try:
        return [f"{key}={value}" for value in override.sweep_string_iterator()]
    except HydraException:
        return [] if override.key_or_group in groups else [f"{key}=null"]


def _jobs(args: list[str], groups: set[str], most: int = 16) -> list[list[str]] | None:
    """The overrides of a multirun's jobs that meet each value of each sweep (every other sweep at
    its first value; ``most`` jobs at most; see ``_choices``). None where a value needs quoting
    again ('a b'): left to hydra."""
    parser = OverridesParser.create()
    try:
        parsed = [parser.parse_override(arg) for arg in args]
    except HydraException:
        return [args]  # unreadable: said as usual
    choices = [c for c in (_choices(arg, o, groups) for arg, o in zip(args, parsed)) if c]
    first = [c[0] for c in choices]
    jobs = [first] + [first[:i] + [value] + first[i + 1:] for i, c in enumerate(choices) for value in c[1:]]
    if any(_parse_error(parser, arg) is not None for one in jobs for arg in one):
        return None
    return jobs[:most]


def override_error(config_dir: str, config_name: str, args: list[str]) -> str | None:
    """Why hydra would refuse the overrides ``args`` of ``config_name`` (one line), or None when
    they compose; with -m (--multirun), those of each job, in a sweep of up to 16. Command lines
    with other flags of hydra's (--cfg, --help, -cd, ...) are left to hydra."""
    flags = [arg for arg in args if arg.startswith("-")]
    if not flags:
        return _compose_error(config_dir, config_name, args)
    if set(flags) - {"-m", "--multirun"}:
        return None
    for job in _jobs([arg for arg in args if arg not in flags], _groups(config_dir, config_name)) or []:
        if (why := _compose_error(config_dir, config_name, job)) is not None:
            return why
    return None


def _composed(config_dir: str, config_name: str, args: list[str]) -> DictConfig | None:
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name, overrides=args, return_hydra_config=True)
    except (HydraException, ValueError, OmegaConfBaseException):
        return None


def _own_options(config_dir: str, config_name: str, group: str, options: list[str]) -> list[str]:
    """Those of a config group's ``options`` that this app's config takes. The apps share conf/: a
    group the config chooses from takes all its options; an added one (experiment) those that
    compose and set only keys the config has (fine-tuning has no data group, pretraining no mode,
    and each app's experiments set its own keys)."""
    base = _composed(config_dir, config_name, [])
    if base is None or group in base.hydra.runtime.choices:
        return options

    def keys(cfg: DictConfig) -> set[str]:
        return {k for k in _keys(OmegaConf.to_container(cfg, resolve=False)) if k.split(".")[0] != "hydra"}
    added = (_composed(config_dir, config_name, [f"+{group}={o}"]) for o in options)
    return [o for o, cfg in zip(options, added) if cfg is not None and keys(cfg) <= keys(base)]


def _folder_options(folder: str) -> list[str]:
    """A config group folder's options: its yaml files' names."""
    return sorted(f.removesuffix(".yaml") for f in os.listdir(folder) if f.endswith(".yaml"))


def _foreign_choice(config_dir: str, config_name: str, args: list[str]) -> str | None:
    """An override choosing another app's option of a shared config group, said as such."""
    for arg in args:
        group, _, option = arg.lstrip("+").partition("=")
        folder = os.path.join(config_dir, group)
        if not group or not os.path.isdir(folder):
            continue
        options = _folder_options(folder)
        own = _own_options(config_dir, config_name, group, options)
        if option in own:
            other = f"{group}={option}" if arg.startswith("+") else f"+{group}={option}"
            if _composed(config_dir, config_name, [arg]) is None \
                    and _composed(config_dir, config_name, [other]) is not None:
                how = "chosen, not added" if arg.startswith("+") else "added, not chosen"
                return f"{group} is {how}: write {other}"
            continue
        if option not in options:
            continue  # no option at all: said with the options hydra lists
        return (f"{group}={option} is not for {config_name}'s config"
                + (f" (its {group} options: {', '.join(own)})" if own else f" (it has no {group} group)"))
    return None


def _deletion(config_dir: str, config_name: str, args: list[str]) -> str | None:
    """A deletion (``~key``, ``~group``) of what the app's config holds, said as such: hydra composes
    it, but every run reads every key of its config (each has a default: null where it may be none)."""
    parser = OverridesParser.create()
    for arg in args:
        override = parser.parse_override(arg)
        key = override.key_or_group
        if not override.is_delete() or re.split(r"[./]", key)[0] == "hydra":
            continue
        folder = os.path.join(config_dir, key)
        if not os.path.isdir(folder):
            return f"{arg} removes {key}, which every run reads; set it instead ({key}=...)"
        options = _folder_options(folder)
        own = _own_options(config_dir, config_name, key, options)
        return f"{arg} removes the {key} group, which every run reads; choose one of its options ({', '.join(own)})"
    return None


def _compose_error(config_dir: str, config_name: str, args: list[str]) -> str | None:
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name, overrides=args, return_hydra_config=True)
        return _deletion(config_dir, config_name, args)
    except OverrideParseException:
        return _unreadable(args)
    except (HydraException, ValueError, OmegaConfBaseException) as err:
        return _foreign_choice(config_dir, config_name, args) or _compose_failure(config_dir, config_name, err)


def _compose_failure(config_dir: str, config_name: str, err: Exception) -> str:
    if isinstance(err, MissingConfigException):
        found = _NOT_FOUND.search(str(err))
        if found is None or "/" not in found.group(1):
            return first_line(err)
        group, option = found.group(1).rsplit("/", 1)
        options = _own_options(config_dir, config_name, group, _options(str(err)))
        return f"{group}={option} is not one of {group}'s options" + (f" ({', '.join(options)})" if options else "")
    if not isinstance(err, HydraException):  # e.g. "=3", where hydra shows a traceback
        return f"cannot compose the config: {first_line(err)}"
    if (sweep := _SWEEP.search(str(err))) is not None:
        return (f"{sweep.group(1)} is several values: add -m to sweep over them, or write a list as "
                "key=[a,b] or a string as key='a,b'")
    if (key := _NOT_OVERRIDABLE.search(str(err))) is not None:
        return _unknown_key(config_dir, config_name, key.group(1))
    return first_line(err)


def _unknown_key(config_dir: str, config_name: str, key: str) -> str:
    if key.startswith("hydra."):
        return f"unknown config key {key}: not one of hydra's settings"
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        known = _keys(OmegaConf.to_container(compose(config_name), resolve=False))
    close = difflib.get_close_matches(key, known, n=3)
    return f"unknown config key {key}" + (f" (did you mean {', '.join(close)}?)" if close else "")

