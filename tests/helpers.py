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


def block_network(monkeypatch) -> None:
    """Makes every download fail: sockets, timm's pretrained loader, the Hub, torch.hub."""
    import socket

    import huggingface_hub
    import timm.models._builder
    import timm.models._hub
    import torch.hub

    def offline(*args, **kwargs):
        raise RuntimeError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
