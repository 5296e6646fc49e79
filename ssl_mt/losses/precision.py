"""The losses' logits in float32, also under ``precision=bf16-mixed``.

``x.float()`` does not keep autocast from running the next matmul in bfloat16: autocast casts
the inputs of every op on its list (matmul, linear, ...) back down. The similarity logits of
NT-Xent and InfoNCE, DINO's cross-entropy and the MIM error are computed inside
:func:`autocast_off`, on float32 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def autocast_off(x: Tensor) -> torch.autocast:
    """A block in which autocast is off on ``x``'s device (ops run in their inputs' dtype)."""
    return torch.autocast(device_type=x.device.type, enabled=False)
