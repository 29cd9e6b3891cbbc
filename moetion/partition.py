"""Splitting a layer list into contiguous pipeline stages.

``balanced_partition`` minimises the heaviest stage (then the most layers on one stage), exactly,
by dynamic programming: layer lists are short, and an exact answer is reproducible everywhere.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from moetion.errors import PartitionError


def balanced_partition(weights: Sequence[float], num_stages: int) -> list[int]:
    """Stage boundaries ``b`` (length ``num_stages + 1``): stage ``s`` owns layers ``b[s]:b[s+1]``.

    Every stage gets at least one layer.
    """
    n = len(weights)
    if num_stages < 1:
        raise PartitionError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > n:
        raise PartitionError(
            f"cannot split {n} layers into {num_stages} stages: every stage needs at least one "
            "layer; use fewer stages or more layers"
        )
    prefix = [0.0]
    for w in weights:
        if w < 0:
            raise PartitionError(f"layer weights must be >= 0, got {w}")
        prefix.append(prefix[-1] + w)

    # best[p][i]: the best (max weight, max layers) splitting the first i layers into p stages.
    inf = (float("inf"), n + 1)
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0)
    for p in range(1, num_stages + 1):
        for i in range(p, n - (num_stages - p) + 1):
            for j in range(p - 1, i):
                prev = best[p - 1][j]
                if prev == inf:
                    continue
                cost = (max(prev[0], prefix[i] - prefix[j]), max(prev[1], i - j))
                if cost < best[p][i]:
                    best[p][i], cut[p][i] = cost, j
    bounds = [n]
    for p in range(num_stages, 0, -1):
        bounds.append(cut[p][bounds[-1]])
    return bounds[::-1]


def layer_weights(
    method: str,
    *,
    names: Sequence[str],
    param_count: Callable[[int], int],
) -> list[float]:
    """Per-layer weights for ``"uniform"``, ``"parameters"`` or ``"type:<regex>"`` partitioning."""
    if method == "uniform":
        return [1.0] * len(names)
    if method == "parameters":
        return [float(param_count(i)) for i in range(len(names))]
    if method.startswith("type:"):
        pattern = method[len("type:"):]
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as error:
            raise PartitionError(f"partition_method {method!r}: invalid regex ({error})") from None
        weights = [1.0 if regex.search(name) else 0.0 for name in names]
        if not any(weights):
            raise PartitionError(
                f"partition_method {method!r} matches no layer; layer types are: {sorted(set(names))}"
            )
        return weights
    raise PartitionError(
        f"unknown partition_method {method!r}: use 'parameters', 'uniform' or 'type:<regex>'"
    )
