"""Masked image modelling behind ``method=mim``.

Masks drawn from (seed, epoch, index) only; the three fills; the bad-input errors; one short
run through ``ssl_mt.pretrain.run`` that lowers the reconstruction loss below what predicting
nothing gives, writes a picture per epoch (PNG and TensorBoard) and exports a plain timm
backbone (no decoder) that loads in timm, smp and the fine-tuning network; and a run stopped
after an epoch and resumed that ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import load_file

from ssl_mt.data.image_io import read_image
from ssl_mt.data.synthetic import generate_dataset
from ssl_mt.losses.mim_loss import masked_reconstruction_loss, normalize_patches
from ssl_mt.models.masking import MaskFill, masked_count, patch_masks, pixel_mask
from ssl_mt.models.mim import MIMModule, PixelDecoder
from ssl_mt.models.multitask_net import MultiTaskNet, timm_key
from ssl_mt.pretrain import build_module, run
from tests.helpers import cause_chain, compose_app

NAME = "test_efficientnet"
BATCH = 8
EPOCHS = 4
# Output stride 8 (dilated last stages) and 16 px patches: 16 patches per 64 px image, so a
# short run has something to learn beyond the patch mean (2 × 2 patches of 32 px hardly do).
LEARNABLE = [
    "+backbone.output_stride=8",
    "method.patch_size=16",
    "method.decoder.channels=[64,32,16]",
    "optim.warmup_epochs=0",
]


def quick_cfg(root: Path, run_dir: Path, *extra: str, epochs: int = EPOCHS):
    return compose_app(
        "pretrain",
        [
            "experiment=quick",
            "method=mim",
            f"data.root={root}",
            f"run_dir={run_dir}",
            "ckpt_path=null",
            "++trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.pin_memory=false",
            f"schedule.stages=[{{size:64,epochs:{epochs},batch_size:{BATCH}}}]",
            "schedule.eval_sizes=[64]",
            "method.decoder.channels=[32,16]",
            "method.reconstructions.num_samples=4",
            *extra,
        ],
    )


def make_module(**kwargs) -> MIMModule:
    torch.manual_seed(0)
    kwargs.setdefault("decoder", {"channels": [16]})
    return MIMModule(
        backbone={"name": NAME}, optim={"name": "adamw"}, channels_last=False, **kwargs
    )


def epoch_values(run_dir: Path, column: str) -> pd.Series:
    frame = pd.read_csv(run_dir / "metrics.csv")
    assert column in frame.columns, f"{column} not logged; columns: {list(frame.columns)}"
    return frame.dropna(subset=[column]).groupby("epoch")[column].last()


# -- masks --------------------------------------------------------------------------------------
def test_masks_depend_only_on_seed_epoch_and_index():
    masks = patch_masks([3, 7, 9], epoch=2, seed=5, grid=(4, 4), ratio=0.6)
    assert masks.shape == (3, 4, 4) and masks.dtype == torch.bool
    assert torch.equal(masks, patch_masks([3, 7, 9], epoch=2, seed=5, grid=(4, 4), ratio=0.6))
    # A sample's mask is its own, whatever else is in the batch or in which order.
    assert torch.equal(masks[1], patch_masks([7], epoch=2, seed=5, grid=(4, 4), ratio=0.6)[0])
    assert torch.equal(masks[[2, 0]], patch_masks([9, 3], 2, 5, (4, 4), 0.6))
    # Another epoch, index or seed draws another mask.
    for other in (
        patch_masks([3, 7, 9], epoch=3, seed=5, grid=(4, 4), ratio=0.6),
        patch_masks([4, 8, 10], epoch=2, seed=5, grid=(4, 4), ratio=0.6),
        patch_masks([3, 7, 9], epoch=2, seed=6, grid=(4, 4), ratio=0.6),
    ):
        assert not torch.equal(masks, other)


def test_every_image_hides_the_same_rounded_share_of_its_patches():
    masks = patch_masks(range(50), epoch=0, seed=0, grid=(3, 3), ratio=0.6)
    assert masks.flatten(1).sum(1).tolist() == [5] * 50  # round(0.6 × 9)
    # Uniform over the positions: every patch is masked about 60% of the time.
    share = patch_masks(range(2000), 0, 0, (3, 3), 0.6).float().mean(0)
    assert share.min() > 0.5 and share.max() < 0.62
    assert masked_count(4, 0.99) == 3 and masked_count(4, 0.01) == 1  # one shown, one hidden
    with pytest.raises(ValueError, match="cannot be masked and still show something"):
        masked_count(1, 0.5)


def test_pixel_masks_cover_whole_patches():
    masks = torch.tensor([[[True, False], [False, True]]])
    pixels = pixel_mask(masks, 3)
    assert pixels.shape == (1, 1, 6, 6)
    assert pixels[0, 0, :3, :3].all() and not pixels[0, 0, :3, 3:].any()
    assert pixels[0, 0, 3:, 3:].all() and not pixels[0, 0, 3:, :3].any()


def test_module_masks_follow_the_epoch_and_the_sample_index():
    module = make_module(patch_size=32, seed=4)
    index = torch.tensor([0, 5])
    mask = module.masks(index, 1, 96, 64)
    assert mask.shape == (2, 1, 96, 64)
    expected = pixel_mask(patch_masks(index, 1, 4, (3, 2), 0.6), 32)
    assert torch.equal(mask, expected)
    assert not torch.equal(mask, module.masks(index, 2, 96, 64))


# -- fills --------------------------------------------------------------------------------------
def fill_problem():
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = pixel_mask(patch_masks([0, 1, 2], 0, 0, (2, 2), 0.5), 4)
    return images, mask


def test_mean_fill_is_the_visible_pixels_mean_colour_and_hides_the_masked_pixels():
    images, mask = fill_problem()
    filled = MaskFill("mean")(images, mask)
    for b in range(3):
        visible = images[b][:, ~mask[b, 0]]
        expected = visible.mean(dim=1)
        torch.testing.assert_close(filled[b][:, mask[b, 0]], expected[:, None].expand(3, 32))
        assert torch.equal(filled[b][:, ~mask[b, 0]], visible)
    changed = images.clone()
    changed[mask.expand_as(images)] = 100.0  # nothing of the masked pixels reaches the encoder
    assert torch.equal(MaskFill("mean")(changed, mask), filled)


def test_token_fill_is_a_learned_colour():
    images, mask = fill_problem()
    fill = MaskFill("token")
    with torch.no_grad():
        fill.token.copy_(torch.tensor([1.0, 2.0, 3.0]))
    filled = fill(images, mask)
    assert filled[0, :, mask[0, 0]].unique(dim=1).tolist() == [[1.0], [2.0], [3.0]]
    filled.sum().backward()
    assert fill.token.grad.abs().min() > 0
    module = make_module(fill="token")
    assert any(p is module.mask_fill.token for m in module.head_modules() for p in m.parameters())


def test_other_fill_takes_the_previous_image_of_the_batch():
    images, mask = fill_problem()
    filled = MaskFill("other")(images, mask)
    for b in range(3):
        on = mask[b, 0]
        assert torch.equal(filled[b][:, on], images[b - 1][:, on])
        assert torch.equal(filled[b][:, ~on], images[b][:, ~on])


# -- the step, against its definition ------------------------------------------------------------
def test_step_loss_is_the_masked_loss_of_the_decoded_masked_input():
    module = make_module(patch_size=32, loss="l1")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([4, 9])
    loss, pooled = module.mim_loss(images, index, epoch=0)
    mask = module.masks(index, 0, 64, 64)
    masked = MaskFill("mean")(images, mask)
    prediction = module.decoder(module.backbone.forward_features(masked))
    expected = masked_reconstruction_loss(prediction, normalize_patches(images, 32), mask, "l1")
    torch.testing.assert_close(loss, expected)
    assert pooled.shape == (2, module.backbone.num_features)
    loss.backward()
    assert module.backbone.conv_stem.weight.grad.abs().sum() > 0
    assert module.decoder.head[0].weight.grad.abs().sum() > 0


def test_decoder_blocks_and_pixel_shuffle_make_up_the_stride():
    features = torch.randn(2, 256, 3, 2)
    for channels in ([], [32], [32, 16, 8, 8, 8]):
        assert PixelDecoder(256, 32, channels)(features).shape == (2, 3, 96, 64)
    with pytest.raises(ValueError, match=r"6 ×2 upsampling blocks exceed the backbone's output"):
        PixelDecoder(256, 32, [8] * 6)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": 16}, r"method\.patch_size=16 must be a multiple of the output stride 32"),
        ({"patch_size": 48}, r"method\.patch_size=48 must be a multiple of the output stride 32"),
        ({"mask_ratio": 1.0}, r"method\.mask_ratio must be in \(0, 1\), got 1\.0"),
        ({"mask_ratio": 0.0}, r"method\.mask_ratio must be in \(0, 1\)"),
        ({"fill": "zero"}, r"method\.fill must be one of \('mean', 'token', 'other'\)"),
        ({"loss": "mse"}, r"method\.loss must be one of \('l1', 'l2'\), got 'mse'"),
        ({"views": {"global_crops": 2}}, r"method\.views must declare 1 view for MIM"),
        ({"decoder": {"width": 3}}, r"method\.decoder: unknown key\(s\) \['width'\]"),
        (
            {"reconstructions": {"every": 2}},
            r"method\.reconstructions: unknown key\(s\) \['every'\]",
        ),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)


def test_a_stage_size_that_is_not_whole_patches_fails_before_training(
    synthetic_root: Path, tmp_path: Path
):
    cfg = quick_cfg(synthetic_root, tmp_path, "schedule.stages=[{size:80,epochs:1,batch_size:8}]")
    with pytest.raises(
        Exception,
        match=r"schedule\.stages\[0\]\.size=80 must be a multiple of "
        r"method\.patch_size=32",
    ) as info:
        run(cfg)
    assert any(isinstance(e, ValueError) for e in cause_chain(info.value))
    assert not (tmp_path / "checkpoints").exists()


def test_the_method_picks_its_mild_geometric_view():
    cfg = compose_app("pretrain", ["experiment=quick", "method=mim"])
    assert cfg.augment.name == "mim" and cfg.augment.color_jitter.p == 0
    assert cfg.data.views.global_crops == 1 and cfg.method.seed == cfg.seed
    assert compose_app("pretrain", ["method=mim", "augment=skin"]).augment.name == "skin"
    assert compose_app("pretrain", ["experiment=quick"]).augment.name == "skin"


# -- a short run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mim") / "data"
    return generate_dataset(root, n=96, size=64, seed=3, workers=1, progress=False)


@pytest.fixture(scope="module")
def mim_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("mim_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(quick_cfg(data_root, run_dir, *LEARNABLE)) == run_dir
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.mark.slow
def test_short_run_lowers_the_reconstruction_loss(mim_run: Path):
    loss = epoch_values(mim_run, "train/loss")
    assert list(loss.index) == list(range(EPOCHS))
    assert loss.iloc[-1] < loss.iloc[0], loss.to_dict()
    # Predicting 0 (every patch's own mean) scores (n - 1) / n ≈ 1 on per-patch normalised
    # targets: below it, the model predicts structure inside the hidden patches.
    assert loss.iloc[-1] < 0.97, loss.to_dict()
    std = epoch_values(mim_run, "train/embedding_std")
    assert std.min() > 0
    assert "knn/tone/top1" in pd.read_csv(mim_run / "metrics.csv").columns


@pytest.mark.slow
def test_a_reconstruction_picture_per_epoch_in_the_run_dir_and_tensorboard(mim_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pictures = sorted((mim_run / "reconstructions").glob("*.png"))
    assert [p.name for p in pictures] == [f"epoch_{e:03d}.png" for e in range(EPOCHS)]
    picture = read_image(pictures[-1])
    # 4 images in 2 columns of [original | masked | reconstruction], 64 px shown at 2×.
    assert picture.shape[1] >= 2 * 3 * 128 and picture.shape[0] >= 2 * 128
    assert not np.array_equal(read_image(pictures[0]), picture)  # the model changed
    events = EventAccumulator(str(mim_run / "tensorboard")).Reload()
    images = events.Images("mim/reconstructions")
    assert [i.step for i in images] == list(range(EPOCHS))


def assert_holds_the_file(state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor]):
    for key, tensor in state.items():
        assert key in file_state, f"{key} is not in the file"
        torch.testing.assert_close(tensor, file_state[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_export_is_the_plain_timm_backbone_without_the_decoder(mim_run: Path, default_tasks):
    path = mim_run / "backbone" / "model.safetensors"
    file_state = load_file(str(path))
    model = timm.create_model(
        NAME, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
    )
    assert set(model.state_dict()) == set(file_state)  # every key, nothing more (no decoder)
    assert_holds_the_file(model.state_dict(), file_state)
    ckpt = torch.load(mim_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("decoder.") for k in ckpt["state_dict"])
    for key, tensor in file_state.items():
        assert torch.equal(tensor, ckpt["state_dict"][f"backbone.{key}"]), key

    encoder = smp.Unet(f"tu-{NAME}", encoder_weights=None).encoder.model
    assert encoder.load_state_dict(file_state, strict=False).missing_keys == []
    assert_holds_the_file(encoder.state_dict(), file_state)
    net = MultiTaskNet(NAME, default_tasks, decoder_channels=[32, 16, 16, 8, 8])
    loaded, _ = net.load_encoder_weights(path)
    assert loaded == len(net.timm_encoder.state_dict())
    assert_holds_the_file(
        {timm_key(k): v for k, v in net.timm_encoder.state_dict().items()}, file_state
    )


# -- resume ----------------------------------------------------------------------------------------
class StopAfterEpoch(L.Callback):
    """Ends ``fit`` after epoch ``epoch``; the end-of-epoch checkpoint is still written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class RecordFitStart(L.Callback):
    """Writes the epoch and step at which ``fit`` starts training to ``path`` (json)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        self.path.write_text(json.dumps(start))


def logged_once_per_epoch(run_dir: Path, column: str) -> list[int]:
    """The epochs of ``column``'s rows in metrics.csv, in file order (repeats kept)."""
    frame = pd.read_csv(run_dir / "metrics.csv")
    return [int(e) for e in frame.dropna(subset=[column])["epoch"]]


@pytest.mark.slow
def test_a_resumed_run_draws_the_same_masks_and_ends_identical(
    synthetic_root: Path, tmp_path: Path
):
    """Resumed after epoch 0, the run reproduces the uninterrupted one bit for bit.

    The masks of epoch 1 come from (seed, 1, index) in both runs; had the resumed run drawn
    others (e.g. from a fresh random state), the weights would differ. The resume point is
    asserted too: a run that silently starts over at epoch 0 also ends bit-identical.
    """
    common = [
        "trainer.deterministic=true",
        "seed=3",
        "ckpt_path=auto",
        "logger=[csv]",
        "data.knn_tasks=[]",
        "method.reconstructions.every_n_epochs=0",
        "++trainer.limit_train_batches=3",
        "method.fill=token",  # the learnable token must be restored too
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    run(quick_cfg(synthetic_root, a, *common, epochs=2))
    stop = f"+callbacks.stop={{_target_:{__name__}.StopAfterEpoch,epoch:0}}"
    run(quick_cfg(synthetic_root, b, *common, stop, epochs=2))
    assert torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    start = tmp_path / "start.json"
    record = f"+callbacks.start={{_target_:{__name__}.RecordFitStart,path:'{start}'}}"
    run(quick_cfg(synthetic_root, b, *common, record, epochs=2))  # the same command, resumed
    # Resumed after epoch 0's 3 steps, not started over (which keeps no old log either).
    assert json.loads(start.read_text()) == {"epoch": 1, "step": 3}
    assert not list(b.glob("metrics.before-restart-*.csv"))

    state_a = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    state_b = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state_a.keys() == state_b.keys() and "mask_fill.token" in state_a
    differ = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:5]}"
    loss_a, loss_b = epoch_values(a, "train/loss"), epoch_values(b, "train/loss")
    assert logged_once_per_epoch(b, "train/loss") == [0, 1]  # no repeated epoch row
    for epoch in (0, 1):
        assert math.isclose(loss_a[epoch], loss_b[epoch], rel_tol=1e-6)


def test_build_module_from_the_app_config():
    module = build_module(compose_app("pretrain", ["experiment=quick", "method=mim"]))
    assert isinstance(module, MIMModule)
    assert module.stride == 32 and module.patch_size == 32 and module.seed == 0
    assert not [k for k in module.backbone.state_dict() if k.startswith("decoder")]
