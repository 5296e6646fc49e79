"""Backbone factory and export: plain timm weights that load without ssl_mt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import load_file

from ssl_mt.models.backbone import BackboneError, create_backbone, export_backbone
from ssl_mt.models.multitask_net import MultiTaskNet, timm_key

NAME = "test_efficientnet"
HEAD_ONLY = ("conv_head.", "bn2.")  # after the last feature map: not in features_only models


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export folder whose every tensor differs from any fresh initialisation."""
    torch.manual_seed(0)
    model = create_backbone(NAME)
    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) + 1.0 + i)
            else:
                tensor.add_(7)  # BatchNorm's num_batches_tracked
    out = tmp_path_factory.mktemp("export") / "backbone"
    return export_backbone(model, NAME, out, image_size=64, extra={"method": "test"})


@pytest.fixture(scope="module")
def exported(export_dir: Path) -> Path:
    """The export's weights file."""
    return export_dir / "model.safetensors"


def assert_holds_the_file(state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor]):
    for key, tensor in state.items():
        assert key in file_state, f"{key} is not in the file"
        torch.testing.assert_close(tensor, file_state[key], rtol=0, atol=0, msg=key)


def test_create_backbone_gives_pooled_features_without_classifier():
    model = create_backbone(NAME)
    assert model.num_classes == 0
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.num_features)


def test_export_writes_a_timm_hub_folder_without_classifier(export_dir: Path, exported: Path):
    assert sorted(p.name for p in export_dir.iterdir()) == ["config.json", "model.safetensors"]
    state = load_file(str(exported))
    assert not [k for k in state if k.startswith("classifier")]
    assert len(state) == len(timm.create_model(NAME, num_classes=0).state_dict())
    config = json.loads((export_dir / "config.json").read_text())
    assert config["architecture"] == NAME
    assert config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert config["ssl_mt"]["num_tensors"] == len(state)
    assert config["ssl_mt"]["method"] == "test"
    assert not list(export_dir.parent.glob("*.tmp"))  # written atomically


@pytest.mark.parametrize("name", [NAME, "test_convnext"])
def test_export_folder_loads_with_timm_local_dir_every_key_matched(name: str, tmp_path: Path):
    model = create_backbone(name)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(1.5)
    folder = export_backbone(model, name, tmp_path / "b", image_size=96, mean=(0.1,) * 3)
    # pretrained=True loads strictly: a missing or unexpected key would raise.
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert loaded.num_classes == 0
    assert_holds_the_file(loaded.state_dict(), model.state_dict())
    assert set(loaded.state_dict()) == set(model.state_dict())
    data = timm.data.resolve_data_config({}, model=loaded)
    assert tuple(data["input_size"]) == (3, 96, 96) and tuple(data["mean"]) == (0.1, 0.1, 0.1)
    # Written again over an older export: replaced whole.
    assert export_backbone(model, name, folder) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_export_refuses_a_file_name(tmp_path: Path):
    with pytest.raises(BackboneError, match=r"an export is a folder"):
        export_backbone(create_backbone(NAME), NAME, tmp_path / "backbone.safetensors")


@pytest.mark.parametrize("num_classes", [0, 5])
def test_export_loads_in_plain_timm(exported: Path, num_classes: int):
    model = timm.create_model(
        NAME,
        pretrained=True,
        num_classes=num_classes,
        pretrained_cfg_overlay={"file": str(exported)},
    )
    file_state = load_file(str(exported))
    state = model.state_dict()
    # timm loads non-strictly when num_classes differs: prove every tensor came from the file.
    classifier = {k for k in state if k.startswith("classifier.")}
    assert (num_classes == 0) == (not classifier)
    assert_holds_the_file({k: v for k, v in state.items() if k not in classifier}, file_state)
    assert set(state) - classifier == set(file_state)


def test_export_loads_in_a_segmentation_models_pytorch_tu_encoder(exported: Path):
    encoder = smp.Unet(f"tu-{NAME}", encoder_weights=None).encoder.model
    file_state = load_file(str(exported))
    result = encoder.load_state_dict(file_state, strict=False)
    assert result.missing_keys == []
    assert all(k.startswith(HEAD_ONLY) for k in result.unexpected_keys)
    assert_holds_the_file(encoder.state_dict(), file_state)


def test_export_loads_through_multitasknet(exported: Path, default_tasks):
    net = MultiTaskNet(NAME, default_tasks, decoder_channels=[32, 16, 16, 8, 8])
    loaded, unused = net.load_encoder_weights(exported)
    encoder_state = net.timm_encoder.state_dict()
    assert loaded == len(encoder_state)
    assert all(k.startswith(HEAD_ONLY) for k in unused)
    file_state = load_file(str(exported))
    assert_holds_the_file({timm_key(k): v for k, v in encoder_state.items()}, file_state)


@pytest.mark.parametrize("as_folder", [False, True])
def test_create_backbone_loads_an_export(exported: Path, as_folder: bool):
    model = create_backbone(NAME, weights=exported.parent if as_folder else exported)
    assert_holds_the_file(model.state_dict(), load_file(str(exported)))


def test_a_folder_without_model_safetensors_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
        create_backbone(NAME, weights=tmp_path)


def test_create_backbone_reads_a_torch_state_dict(exported: Path, tmp_path: Path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": load_file(str(exported))}, path)
    model = create_backbone(NAME, weights=path)
    assert_holds_the_file(model.state_dict(), load_file(str(exported)))


# -- bad input ----------------------------------------------------------------------------
def test_unknown_name_lists_close_names():
    with pytest.raises(
        BackboneError, match=r"unknown timm model 'efficientnet_b5x'.*efficientnet_b5"
    ):
        create_backbone("efficientnet_b5x")


def test_weights_of_another_model_name_the_mismatched_keys(exported: Path):
    with pytest.raises(BackboneError) as info:
        create_backbone("efficientnet_b0", weights=exported)
    message = str(info.value)
    assert str(exported) in message and "does not fit" in message
    assert "missing key(s)" in message and "shape mismatch(es)" in message
    assert "conv_stem.weight: file (24, 3, 3, 3) vs model (32, 3, 3, 3)" in message


def test_missing_weights_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nope\.safetensors"):
        create_backbone(NAME, weights=tmp_path / "nope.safetensors")


def test_pretrained_and_weights_together_are_refused(exported: Path):
    with pytest.raises(BackboneError, match=r"pretrained=true OR backbone\.weights"):
        create_backbone(NAME, pretrained=True, weights=exported)
