"""The fine-tuned multi-task model as one ONNX graph (``model.onnx`` + ``model.json``).

Input ``image``: float32 (N, 3, H, W), RGB in [0, 1] normalised with the recorded ``mean`` and
``std`` (what the evaluation transform does); N, H and W are dynamic (H and W multiples of
the encoder's stride 32). One output per task, named after it, as probabilities:
segmentation (N, 1, H, W) foreground probability (sigmoid), classification (N, C) class
probabilities (softmax) in the order of ``classes``. ``model.json`` and the graph's metadata
say the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_META = "model.json"
STRIDE = 32  # smp encoders downsample 5 times


class ProbabilityOutputs(nn.Module):
    """A multi-task network whose outputs are a tuple of per-task probabilities."""

    def __init__(self, net: nn.Module, tasks: list) -> None:
        super().__init__()
        self.net = net
        self.tasks = list(tasks)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        outputs = self.net(image)
        return tuple(
            outputs[t.name].sigmoid() if t.is_segmentation else outputs[t.name].softmax(dim=1)
            for t in self.tasks
        )


def onnx_description(
    module: Any, size: int, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """What ``model.json`` says: input layout and normalisation, outputs per task."""
    return {
        "input": {
            "name": "image",
            "shape": ["N", 3, "H", "W"],
            "dtype": "float32",
            "layout": "RGB, scaled to [0, 1], then (x - mean) / std",
            "mean": list(mean),
            "std": list(std),
            "trained_size": size,
            "size_multiple": STRIDE,
        },
        "outputs": {
            t.name: (
                {"kind": "segmentation", "shape": ["N", 1, "H", "W"], "value": "sigmoid"}
                if t.is_segmentation
                else {
                    "kind": "classification",
                    "shape": ["N", len(t.classes)],
                    "value": "softmax",
                    "classes": list(t.classes),
                }
            )
            for t in module.tasks
        },
        "backbone": module.hparams["backbone"]["name"],
    }


def export_onnx(
    module: Any, out: str | Path, size: int, mean: Sequence[float], std: Sequence[float]
) -> Path:
    """Writes ``out/model.onnx`` and ``out/model.json`` for a
    :class:`~ssl_mt.models.multitask.MultiTaskModule`; returns the ONNX file.

    Uses torch's ``torch.export``-based exporter (needs ``onnxscript``; ``pip install
    ssl_mt[onnx]``), with dynamic batch and image size.
    """
    import onnx

    if size % STRIDE:
        raise ValueError(f"--size must be a multiple of {STRIDE}, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wrapper = ProbabilityOutputs(module.net, module.tasks).eval().float().cpu()
    # torch.export specialises a dimension traced at size 1: trace with at least 2 cells of
    # the output stride (a 32 px model too), the graph stays dynamic in H and W.
    traced = max(size, 2 * STRIDE)
    example = torch.zeros(2, 3, traced, traced)
    batch = torch.export.Dim("batch", min=1, max=4096)
    rows = torch.export.Dim("rows", min=1, max=256)
    cols = torch.export.Dim("cols", min=1, max=256)
    path = out / ONNX_FILE
    tmp = out / (ONNX_FILE + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            str(tmp),
            dynamo=True,
            input_names=["image"],
            output_names=[t.name for t in module.tasks],
            dynamic_shapes={"image": {0: batch, 2: STRIDE * rows, 3: STRIDE * cols}},
            external_data=False,
            verbose=False,
        )
    description = onnx_description(module, size, mean, std)
    model = onnx.load(str(tmp))
    onnx.helper.set_model_props(model, {"ssl_mt": json.dumps(description)})
    onnx.save(model, str(tmp))
    tmp.replace(path)
    (out / ONNX_META).write_text(json.dumps(description, indent=2) + "\n")
    log.info("wrote %s", path)
    return path
