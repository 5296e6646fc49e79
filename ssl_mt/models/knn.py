"""Weighted k-nearest-neighbour classification of frozen features.

- [0] Wu et al., Unsupervised Feature Learning via Non-Parametric Instance Discrimination,
  CVPR 2018, https://arxiv.org/abs/1805.01978 (the weighted vote used here)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Predicts a class for each query from its k most similar bank entries.

    Args:
        bank: (M, D) features with known labels.
        bank_labels: (M,) class indices.
        queries: (Q, D) features to classify.
        num_classes: Number of classes.
        k: Neighbours per query (capped at M).
        temperature: Sharpness of the similarity weights ``exp(sim / T)``.
        chunk: Queries per matrix product (bounds memory).

    Returns:
        (Q,) predicted class indices.
    """
    if bank.shape[0] == 0:
        raise ValueError("kNN needs a non-empty memory bank")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else queries.new_zeros(0, dtype=torch.long)


def embedding_std(z: Tensor) -> Tensor:
    """Mean per-dimension std of l2-normalised embeddings: ≈ 1/√D when healthy, → 0 collapsed.

    - [0] SimSiam, 2021, https://arxiv.org/abs/2011.10566 (Sec. 4.1, the collapse indicator)
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
