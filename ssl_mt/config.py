"""Where the Hydra configs live, the OmegaConf resolvers they use, and small loaders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _total_epochs(stages: Any) -> int:
    return int(sum(int(stage["epochs"]) for stage in stages))


def _first_stage(stages: Any, key: str) -> Any:
    return stages[0][key]


def _auto_precision() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    """Registers the resolvers the configs use (idempotent)."""
    resolvers = {
        "total_epochs": _total_epochs,
        "first_stage": _first_stage,
        "auto_precision": _auto_precision,
        "sqrt": lambda x: math.sqrt(float(x)),
        "last": lambda items: items[len(items) - 1],
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def load_tasks_config(name_or_path: str | Path = "default") -> DictConfig:
    """Loads a ``conf/tasks`` option by name (``default``) or a YAML file by path.

    Resolves the option's own ``defaults`` list (one level) the way Hydra would.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_DIR / "tasks" / f"{name_or_path}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONF_DIR / "tasks").glob("*.yaml"))
        raise FileNotFoundError(f"no task config {name_or_path!r}; options: {options}")
    config = OmegaConf.load(path)
    defaults = config.pop("defaults", [])
    merged = OmegaConf.create()
    for entry in defaults:
        if entry != "_self_":
            merged = OmegaConf.merge(merged, load_tasks_config(path.parent / f"{entry}.yaml"))
    return OmegaConf.merge(merged, config)


register_resolvers()


class ConfigKeyError(KeyError):
    """A config holds a key the app does not know (usually a typo in an experiment file)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def check_top_level_keys(cfg: DictConfig, app: str) -> None:
    """Fails on a top-level key the app does not define, naming it and close matches.

    Command-line typos are caught by Hydra's struct mode; this catches the ones in YAML
    files (an experiment adding ``seeed: 1`` would otherwise be silently ignored).
    """
    import difflib

    primary = OmegaConf.load(CONF_DIR / f"{app}.yaml")
    groups = {
        next(iter(entry)).split("@")[0].lstrip("/")
        for entry in OmegaConf.to_container(primary.get("defaults", []))
        if isinstance(entry, dict)
    }
    known = (set(primary.keys()) - {"defaults"}) | groups | {"hydra"}
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigKeyError(f"unknown config key {key!r} for the {app} app.{hint}")


# Plain-settings groups: nothing instantiates them, so nothing else would reject a typo.
# (Groups with a _target_ fail on an unknown argument; backbone keys go to timm, which does.)
SETTINGS_GROUPS = ("optim", "augment", "schedule")


def check_group_keys(cfg: DictConfig) -> None:
    """Fails on a key of a settings group that none of the group's options defines."""
    import difflib

    for group in SETTINGS_GROUPS:
        if group not in cfg or cfg[group] is None:
            continue
        allowed: set[str] = set()
        for option in (CONF_DIR / group).glob("*.yaml"):
            allowed |= set(OmegaConf.load(option).keys()) - {"defaults"}
        for key in cfg[group]:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=3)
                hint = f" Did you mean {', '.join(f'{group}.{c}' for c in close)}?" if close else ""
                raise ConfigKeyError(f"unknown config key '{group}.{key}'.{hint}")


def check_types(cfg: DictConfig) -> None:
    """Type checks of the app-level settings (groups are checked by their constructors)."""
    expected = {"seed": int, "channels_last": bool, "compile": bool, "experiment_name": str}
    for key, kind in expected.items():
        if key in cfg and not isinstance(cfg[key], kind):
            raise TypeError(f"config key {key!r} must be {kind.__name__}, got {cfg[key]!r}")
