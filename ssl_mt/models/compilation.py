"""Room in dynamo's cache for every static graph a run compiles.

``torch.compile(dynamic=False)`` compiles one graph per input shape and grad mode: each
training (size, batch) of the progressive schedule, each evaluation size with its partial
last batch, train and eval. Dynamo keeps at most ``recompile_limit`` graphs per frame (8 by
default) and then runs that frame eagerly for every new shape, silently: the run goes on
uncompiled. Each module that compiles raises the limit to what it needs, and never relies
on another library's import having raised it (``timm.optim`` sets it to a million).
"""

from __future__ import annotations

# Graphs allowed per shape family (a training stage, an evaluation size, train/eval modes):
# a few shapes each (multi-crop views, partial last batches), with room to spare.
GRAPHS_PER_FAMILY = 8


def raise_recompile_limit(families: int) -> int:
    """Raises dynamo's per-frame graph limit to at least ``GRAPHS_PER_FAMILY * families``.

    Never lowers a limit already set higher. Returns the limit now in force.
    """
    from torch._dynamo import config as dynamo_config  # only runs that compile pay the import

    graphs = GRAPHS_PER_FAMILY * max(1, int(families))
    # torch >= 2.6 names it recompile_limit (cache_size_limit stays as an alias).
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    limit = max(int(getattr(dynamo_config, name)), graphs)
    setattr(dynamo_config, name, limit)
    # The cap over all frames of one code object must leave room for this one's graphs.
    total = (
        "accumulated_recompile_limit"
        if hasattr(dynamo_config, "accumulated_recompile_limit")
        else "accumulated_cache_size_limit"
    )
    if hasattr(dynamo_config, total):
        setattr(dynamo_config, total, max(int(getattr(dynamo_config, total)), graphs))
    return limit
