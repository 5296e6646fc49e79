"""Loading checkpoints without running code stored in them.

A ``torch.save`` file is a pickle: fully unpickled (``weights_only=False``), it can import
and call anything its author chose. The checkpoints ssl_mt writes hold only tensors and
plain containers (its modules save their hyper-parameters through
:func:`plain_hyper_parameters`), so every checkpoint load goes through
:func:`load_checkpoint_file`, which uses ``torch.load(weights_only=True)``. A file that holds more (pickled Python objects, e.g.
the OmegaConf hyper-parameters of runs written by older versions) is refused with
:class:`UnsafeCheckpointError`; a user who made that file can opt in per load
(``--trust-checkpoint`` on the command lines, ``trust_checkpoint=true`` in the Hydra apps),
which loads that file with full unpickling and logs a warning.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CLI_OPT_IN = "--trust-checkpoint"
HYDRA_OPT_IN = "trust_checkpoint=true"
BOTH_OPT_INS = f"{CLI_OPT_IN} (predict, export, probe) or {HYDRA_OPT_IN} (finetune, pretrain)"

# How torch's weights-only unpickler starts every refusal (torch.serialization).
_WEIGHTS_ONLY_FAILURE = "Weights only load failed"
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (\S+)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects beyond tensors and plain containers."""

    def __init__(self, path: str | Path, found: Sequence[str], opt_in: str) -> None:
        what = f" ({', '.join(found)})" if found else ""
        super().__init__(
            f"{path}: refused: the file holds code objects{what}, pickled Python objects "
            "beyond tensors and plain containers, which loading would run; only if you made "
            f"this file yourself (e.g. with an older ssl_mt), load it with {opt_in}"
        )
        self.path = Path(path)
        self.found = list(found)


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """The command lines' opt-in ``--trust-checkpoint`` (``args.trust_checkpoint``)."""
    parser.add_argument(
        CLI_OPT_IN,
        action="store_true",
        help="load a checkpoint holding pickled Python objects (e.g. one an older ssl_mt "
        "wrote) with full unpickling, which runs any code in it: only for files you made",
    )


def load_checkpoint_file(
    path: str | Path,
    *,
    trust: bool = False,
    opt_in: str = BOTH_OPT_INS,
    map_location: Any = "cpu",
    mmap: bool = False,
    allow: Sequence[type] = (),
) -> Any:
    """``torch.load`` of ``path`` that never unpickles code unless the file is trusted.

    Args:
        path: A ``torch.save`` file.
        trust: The user's explicit opt-in for this file: full unpickling, with a warning.
        opt_in: How the user gives that opt-in where this load happens (for the message).
        map_location: As ``torch.load``'s.
        mmap: Map the file instead of reading it (zip-format files only).
        allow: Classes a caller's format needs beyond tensors and plain containers
            (``torch.serialization.safe_globals``), each one by name.

    Raises:
        UnsafeCheckpointError: Not trusted, and the file holds more than tensors and plain
            containers; the message names the file and ``opt_in``.
        Exception: ``torch.load``'s own errors for files that are not ``torch.save`` files
            or are torn.
    """
    if trust:
        log.warning(
            "%s: loaded with full unpickling (%s): it can run any code stored in the file",
            path,
            opt_in,
        )
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    with torch.serialization.safe_globals(list(allow)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            found = _refused_objects(path, error)
            if found is None:
                raise
    raise UnsafeCheckpointError(path, found, opt_in)


def plain_hyper_parameters(checkpoint: dict[str, Any]) -> None:
    """Turns OmegaConf containers in a checkpoint's ``hyper_parameters`` into dicts and lists
    (in place, resolved), so that the file loads weights-only (a module's ``on_save_checkpoint``)."""
    if checkpoint.get("hyper_parameters") is not None:
        checkpoint["hyper_parameters"] = plain_containers(checkpoint["hyper_parameters"])


def plain_containers(value: Any) -> Any:
    """``value`` with every OmegaConf container (nested too) as plain dicts and lists."""
    from omegaconf import Container, OmegaConf

    if isinstance(value, Container):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {key: plain_containers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_containers(item) for item in value]
    if type(value) is tuple:
        return tuple(plain_containers(item) for item in value)
    return value


def _refused_objects(path: str | Path, error: pickle.UnpicklingError) -> list[str] | None:
    """Why the weights-only load refused ``path``: the globals it imports (best effort, for
    the message); None when the file is no pickle torch wrote (text, garbage: not code)."""
    message = str(error)
    if not message.startswith(_WEIGHTS_ONLY_FAILURE):
        return None
    if zipfile.is_zipfile(path):  # a torch archive whose pickle holds disallowed objects
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            return []
    detail = message.split("WeightsUnpickler", 1)[-1]  # a legacy-format file
    if "Unsupported operand" in detail:
        return None
    return _UNSUPPORTED_GLOBAL.findall(detail)[:1]
