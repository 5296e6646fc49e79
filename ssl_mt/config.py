"""Where the Hydra configs live, the OmegaConf resolvers they use, and the one config loader.

Every config the project reads — the two apps, the data CLI, the benchmark, the tests — is
composed by Hydra over the same tree (:func:`compose`), so defaults lists, interpolations,
experiments and a user's own config folder (Hydra's search path) mean the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _find_conf_dir() -> Path:
    """``conf/`` of this installation: inside the package in a wheel, at the repo top level
    in a checkout (``pyproject.toml`` maps the one onto the other)."""
    package = Path(__file__).resolve().parent
    packaged = package / "conf"
    if (packaged / "finetune.yaml").is_file():
        return packaged
    return package.parent / "conf"


CONF_DIR = _find_conf_dir()
APPS = ("pretrain", "finetune")


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


def _search_path_override(config_dirs: Sequence[str | Path]) -> list[str]:
    if not config_dirs:
        return []
    paths = ",".join(f"file://{Path(d).resolve()}" for d in config_dirs)
    return [f"hydra.searchpath=[{paths}]"]


def compose(
    app: str,
    overrides: Sequence[str] = (),
    config_dirs: Sequence[str | Path] = (),
) -> DictConfig:
    """The config of ``app`` (``pretrain`` | ``finetune``) composed as its command line would.

    Args:
        app: The Hydra app whose primary config is composed.
        overrides: Hydra overrides, e.g. ``["experiment=quick", "data.root=DIR"]``.
        config_dirs: Extra config folders (Hydra's search path; the same folder layout as
            ``conf/``): a user's own experiments, tasks or augment presets, found by name.

    ``run_dir`` (Hydra's output dir, which exists only inside a running app) defaults to
    ``runs/<app>/composed``; pass ``run_dir=...`` to change it.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if app not in APPS:
        raise ValueError(f"unknown app {app!r}; choose from {list(APPS)}")
    register_resolvers()
    overrides = list(overrides)
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides.insert(0, f"run_dir=runs/{app}/composed")
    overrides = _search_path_override(config_dirs) + overrides
    # compose() outside a running app must not disturb one that is running (notebooks, tests).
    previous = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    if previous is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=app, overrides=overrides)
    finally:
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def group_options(group: str, config_dirs: Sequence[str | Path] = ()) -> list[str]:
    """The option names of a config group, in ``conf/`` and the extra config folders."""
    folders = [CONF_DIR, *(Path(d) for d in config_dirs)]
    return sorted({p.stem for folder in folders for p in (folder / group).glob("*.yaml")})


def app_groups(app: str) -> set[str]:
    """The config groups in ``app``'s defaults list."""
    defaults = OmegaConf.load(CONF_DIR / f"{app}.yaml").get("defaults", [])
    return {
        next(iter(entry)).split("@")[0].lstrip("/")
        for entry in OmegaConf.to_container(defaults)
        if isinstance(entry, dict)
    }


def load_group(
    group: str,
    name_or_path: str | Path,
    app: str | None = None,
    config_dirs: Sequence[str | Path] = (),
) -> DictConfig:
    """One option of a config group, composed with the rest of an app's config.

    ``app`` defaults to the first app (finetune, then pretrain) whose defaults hold ``group``.

    ``name_or_path`` is an option name (``default``) or the path of a YAML file laid out as
    in ``conf/`` (``MYCONF/tasks/mine.yaml``: its folder's parent joins the search path).
    """
    config_dirs = list(config_dirs)
    name = str(name_or_path)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"no {group} config file {path}")
        if path.parent.name != group:
            raise ValueError(
                f"{path}: a {group} option must live in a folder named {group!r} of a config "
                f"folder (e.g. myconf/{group}/{path.name}), which joins Hydra's search path"
            )
        config_dirs.append(path.parent.parent)
        name = path.stem
    if name not in group_options(group, config_dirs):
        raise FileNotFoundError(
            f"no {group} config {name!r}; options: {group_options(group, config_dirs)}"
        )
    if app is None:
        app = next((a for a in ("finetune", "pretrain") if group in app_groups(a)), None)
        if app is None:
            raise ValueError(f"no app has a config group {group!r}")
    node = compose(app, [f"{group}={name}"], config_dirs)[group]
    # Detached from the app's config: interpolations resolved, open for merges (not struct).
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


def load_tasks_config(name_or_path: str | Path = "default") -> DictConfig:
    """The ``tasks`` option ``name_or_path`` (see :func:`load_group`)."""
    return load_group("tasks", name_or_path)


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
    known = (set(primary.keys()) - {"defaults"}) | app_groups(app) | {"hydra"}
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
    expected = {
        "seed": int,
        "channels_last": bool,
        "compile": bool,
        "experiment_name": str,
        "trust_checkpoint": bool,
    }
    for key, kind in expected.items():
        if key in cfg and not isinstance(cfg[key], kind):
            raise TypeError(f"config key {key!r} must be {kind.__name__}, got {cfg[key]!r}")
