"""Helpers shared by the test modules: composing the apps' configs, reading error causes."""

from __future__ import annotations

from collections.abc import Sequence

from ssl_mt.config import compose


def compose_app(app: str, overrides: Sequence[str]):
    """The composed config of ``pretrain`` or ``finetune`` with ``overrides``.

    ``run_dir`` (Hydra's output dir outside a Hydra app) defaults to a path no test writes;
    tests that run pass their own.
    """
    return compose(app, ["run_dir=/tmp/unused", *overrides])


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors behind it (Hydra's instantiate wraps the real one)."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain
