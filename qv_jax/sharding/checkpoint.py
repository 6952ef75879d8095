"""A qv-jax checkpoint restored straight into the shards of a mesh."""

from __future__ import annotations

import os

from flax import nnx
from jax.sharding import Mesh

from qv_jax.model.checkpoint import load_checkpoint, read_config
from qv_jax.sharding.plan import ShardingPlan


def restore_checkpoint(path: str | os.PathLike, mesh: Mesh, dtype=None) -> tuple[ShardingPlan, nnx.GraphDef, nnx.State]:
    """A qv-jax checkpoint restored onto ``mesh``: orbax reads each device's slice of each parameter straight
    into its shard; KV projections of a replicated-KV plan are restored whole and then repeated per device."""
    config, _ = read_config(path)
    plan = ShardingPlan.create(config, mesh)
    _, _, state = load_checkpoint(path, dtype, sharding=lambda p, _: plan.checkpoint_sharding(p))
    values = {tuple(p): plan.runtime_value(tuple(p), v.get_value()) for p, v in nnx.to_flat_state(state)}
    return plan, *plan.build(values)
