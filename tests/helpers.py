"""Helpers shared by the test modules: composing the apps' configs, reading error causes."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_dir

from ssl_mt.config import CONF_DIR, register_resolvers


def compose_app(app: str, overrides: Sequence[str]):
    """The composed config of ``pretrain`` or ``finetune`` with ``overrides``.

    ``run_dir`` (Hydra's output dir outside a Hydra app) defaults to a path no test writes;
    tests that run pass their own.
    """
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=app, overrides=["run_dir=/tmp/unused", *overrides])


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors behind it (Hydra's instantiate wraps the real one)."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain
