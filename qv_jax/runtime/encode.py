"""Jitted vision encoding and token embedding (frames -> visual tokens), on one device or over a mesh.

On a data-parallel mesh one video's frames are split over ``"data"`` (:func:`splits_frames`): each data shard
encodes its own temporal patches while the weights stay split over ``"model"``. Exact, because vision attention
(windows and full) never crosses frames and tokens come out frame-major.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from qv_jax.model.preprocess import patchify
from qv_jax.model.vision_layout import Grid
from qv_jax.sharding.mesh import DATA_AXIS

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "grid"))
def encode_patches(graphdef: nnx.GraphDef, state: nnx.State, patches_PC: Array, grid: Grid) -> Array:
    """Visual embeddings ``[tokens, D]`` of processor-style pixel values for the (static) grids ``grid``."""
    return nnx.merge(graphdef, state).encode_vision(patches_PC, grid)


@functools.partial(jax.jit, static_argnames=("graphdef", "as_images"))
def encode_frames(graphdef: nnx.GraphDef, state: nnx.State, frames: Array, as_images: bool = False) -> Array:
    """Visual embeddings ``[tokens, D]`` of uint8 frames ``[frames, height, width, 3]``: one video, or one image
    per frame with ``as_images``."""
    model = nnx.merge(graphdef, state)
    patches_PC, grid = patchify(frames, model.config.vision, as_images=as_images)
    return model.encode_vision(patches_PC, grid)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    ids_BT: Array,
    image_embeds: Array | None = None,
    video_embeds: Array | None = None,
) -> Array:
    """Token embeddings ``[B, T, D]`` with visual embeddings in the ``<|image_pad|>`` / ``<|video_pad|>`` slots."""
    return nnx.merge(graphdef, state).embed(ids_BT, image_embeds=image_embeds, video_embeds=video_embeds)


def splits_frames(mesh: Mesh, temporal_patches: int) -> bool:
    """Whether one video of ``temporal_patches`` (frame pairs) is encoded with its frames split over ``"data"``:
    a data axis larger than one that divides them."""
    data = mesh.shape[DATA_AXIS]
    return data > 1 and temporal_patches % data == 0


def _over_data(encode, mesh: Mesh):
    """``encode(state, local_input)`` per data shard: ``"data"`` manual (each shard its own frames, the state whole
    along it), ``"model"`` left to the partitioner (the weights stay split)."""
    return jax.shard_map(
        encode, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS), axis_names={DATA_AXIS}, check_vma=False
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "grid", "mesh"))
def encode_patches_by_frames(graphdef: nnx.GraphDef, state: nnx.State, patches_PC: Array, grid: Grid, mesh: Mesh):
    """:func:`encode_patches` of one video (``grid = ((t, h, w),)``, the processor's frame-major order) with its
    frames split over ``"data"`` (needs :func:`splits_frames`): each shard encodes ``t / data`` temporal patches."""
    ((t, h, w),) = grid
    local = ((t // mesh.shape[DATA_AXIS], h, w),)

    def encode(state, patches):
        return nnx.merge(graphdef, state).encode_vision(patches, local)

    return _over_data(encode, mesh)(state, patches_PC)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def encode_frames_by_frames(graphdef: nnx.GraphDef, state: nnx.State, frames: Array, mesh: Mesh) -> Array:
    """:func:`encode_frames` of one video with its frames split over ``"data"`` (patchified per shard); the frames
    must split into whole temporal patches per data shard."""

    def encode(state, local_frames):
        model = nnx.merge(graphdef, state)
        patches_PC, grid = patchify(local_frames, model.config.vision)
        return model.encode_vision(patches_PC, grid)

    return _over_data(encode, mesh)(state, frames)
