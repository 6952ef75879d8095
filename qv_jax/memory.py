"""VideoMemory: the pruned KV cache of one video, reusable for any number of questions, saved with orbax.

With a question-independent score rule the memory QuickPrefill leaves behind does not depend on the question, so
one encode serves many questions. A memory only makes sense with the model that made it: it carries a
:class:`ModelFingerprint`, and another model refuses it with :class:`~qv_jax.errors.MemoryMismatchError`. Saved
layout: docs/videoqa.md, "Memories".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.cache.layered import LayeredKV
from qv_jax.errors import CheckpointError, MemoryMismatchError
from qv_jax.marker import atomic_output, read_marker, write_marker
from qv_jax.model.checkpoint import restore_arrays
from qv_jax.model.config import ModelConfig
from qv_jax.pipeline.executor import Timings
from qv_jax.pipeline.plan import GroupPlan, make_group_plan

__all__ = ["MemoryInfo", "ModelFingerprint", "VideoMemory", "is_memory_dir", "read_memory_info"]

FORMAT = "qv-jax-video-memory"
VERSION = 1
MARKER = "qv_jax_memory.json"
# Values sampled from each weight tensor for the fingerprint: enough that another checkpoint of the same
# architecture differs, cheap to gather from a sharded 7B model.
_SAMPLES_PER_TENSOR = 32


def is_memory_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a saved :class:`VideoMemory` directory."""
    return (Path(path) / MARKER).is_file()


@dataclasses.dataclass(frozen=True)
class ModelFingerprint:
    """What identifies the model a memory belongs to: its config, parameter dtype and a weight digest.

    The digest hashes, for every parameter in path order, its path, shape, dtype and ``_SAMPLES_PER_TENSOR``
    evenly spaced values (bit-exact, so it does not depend on the device or the sharding that computes it).
    """

    config: dict
    dtype: str
    weights: str

    @classmethod
    def of(cls, config: ModelConfig, state) -> ModelFingerprint:
        """Fingerprint of a model given as its config and NNX state."""
        from flax import nnx

        flat = sorted(nnx.to_flat_state(state), key=lambda item: tuple(str(p) for p in item[0]))
        samples = []
        for _, var in flat:
            value = var.get_value()
            positions = np.unique(np.linspace(0, value.size - 1, min(_SAMPLES_PER_TENSOR, value.size)).astype(int))
            samples.append(jnp.take(value.reshape(-1), jnp.asarray(positions)))
        digest = hashlib.sha256()
        for (path, var), sample in zip(flat, jax.device_get(samples), strict=True):
            value = var.get_value()
            digest.update(f"{'/'.join(str(p) for p in path)}:{value.shape}:{value.dtype};".encode())
            digest.update(np.asarray(sample, np.float32).tobytes())
        dtype = str(jnp.dtype(flat[0][1].get_value().dtype)) if flat else "float32"
        return cls(config=json.loads(json.dumps(config.to_dict())), dtype=dtype, weights=digest.hexdigest())

    def check(self, model: ModelFingerprint, what: str) -> None:
        """Raise :class:`MemoryMismatchError` naming what differs when ``model`` is not the model of ``what``."""
        if self.config != model.config:
            keys = _differing_keys(self.config, model.config)
            raise MemoryMismatchError(
                f"{what} was made by a model with another configuration (differs in {', '.join(keys)}); "
                "encode the video again with this model"
            )
        if self.dtype != model.dtype:
            raise MemoryMismatchError(
                f"{what} holds {self.dtype} activations but this model runs in {model.dtype}; load the model in "
                f"{self.dtype} or encode the video again"
            )
        if self.weights != model.weights:
            raise MemoryMismatchError(
                f"{what} was made by a model with the same configuration but other weights (or with its attention "
                "heads in another order, as loading with sparsity= reorders them); encode the video again with this "
                "model"
            )


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


@dataclasses.dataclass(frozen=True)
class MemoryInfo:
    """How a memory was made: the video, its frame plan and the QuickPrefill settings (enough to rebuild the
    :class:`~qv_jax.pipeline.GroupPlan`)."""

    video: str
    frame_indices: tuple[int, ...]
    height: int
    width: int
    sample_fps: float
    prefix_ids: tuple[int, ...]
    group_frames: int
    retention: float
    prune: str
    layer_decay: float | None
    seed: int

    def group_plan(self, config: ModelConfig) -> GroupPlan:
        return make_group_plan(
            config,
            np.asarray(self.prefix_ids, np.int32),
            num_frames=len(self.frame_indices),
            height=self.height,
            width=self.width,
            sample_fps=self.sample_fps,
            group_frames=self.group_frames,
            retention=self.retention,
            prune=self.prune,
            layer_decay=self.layer_decay,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class VideoMemory:
    """The pruned KV memory of one video (prefix + kept tokens of every group, per layer) and how it was made.

    ``cache`` holds the keys and values; ``plan`` the token layout and positions the question continues from;
    ``info`` the video and settings; ``fingerprint`` the model it belongs to; ``timings`` how long making it took
    (not saved).
    """

    cache: LayeredKV
    plan: GroupPlan
    info: MemoryInfo
    fingerprint: ModelFingerprint
    timings: Timings | None = None

    @property
    def tokens_per_layer(self) -> np.ndarray:
        """``[layers]`` tokens each layer holds."""
        return np.asarray(jax.device_get(self.cache.lengths))

    @property
    def kv_bytes(self) -> int:
        """Bytes of the keys and values the memory holds (filled slots of every layer)."""
        return self.cache.kv_bytes

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, inputs: tuple = ()) -> Path:
        """Write the memory to ``directory`` (orbax arrays + a JSON description), whole or not at all
        (:func:`qv_jax.marker.atomic_output`); returns the directory. ``inputs`` (the video, the model) are never
        replaced by it."""
        cache = self.cache.trimmed(max(1, int(self.tokens_per_layer.max())))
        import orbax.checkpoint as ocp

        with atomic_output(directory, overwrite=overwrite, inputs=inputs) as partial:
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(partial / "kv", _as_tree(cache))
            checkpointer.wait_until_finished()
            write_marker(partial, MARKER, self._meta(cache))
        return Path(directory).absolute()

    def _meta(self, cache: LayeredKV) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "info": dataclasses.asdict(self.info),
            "fingerprint": dataclasses.asdict(self.fingerprint),
            "capacity": cache.capacity,
            "num_kv_heads": cache.k[0].shape[1],
            "head_dim": cache.k[0].shape[3],
        }

    @classmethod
    def load(cls, directory: str | os.PathLike) -> VideoMemory:
        """Read a memory written by :meth:`save` onto the default device."""
        path = Path(directory).absolute()
        meta = read_marker(path, MARKER, format=FORMAT, version=VERSION, what="a saved video memory")
        try:
            info = _info(meta)
            fingerprint = ModelFingerprint(**meta["fingerprint"])
            config = ModelConfig.from_dict(fingerprint.config)
            capacity, heads, head_dim = int(meta["capacity"]), int(meta["num_kv_heads"]), int(meta["head_dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / MARKER}: malformed ({type(e).__name__}: {e})") from e
        layers = config.text.num_layers
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        kv = jax.ShapeDtypeStruct((1, heads, capacity, head_dim), jnp.dtype(fingerprint.dtype), sharding=sharding)
        target = {
            "k": {str(i): kv for i in range(layers)},
            "v": {str(i): kv for i in range(layers)},
            "token_index": jax.ShapeDtypeStruct((layers, 1, capacity), jnp.int32, sharding=sharding),
            "lengths": jax.ShapeDtypeStruct((layers,), jnp.int32, sharding=sharding),
        }
        tree = restore_arrays(path / "kv", target, "memory's arrays")
        cache = LayeredKV(
            k=tuple(tree["k"][str(i)] for i in range(layers)),
            v=tuple(tree["v"][str(i)] for i in range(layers)),
            token_index=tree["token_index"],
            lengths=tree["lengths"],
        )
        return cls(cache=cache, plan=info.group_plan(config), info=info, fingerprint=fingerprint)


def read_memory_info(directory: str | os.PathLike) -> MemoryInfo:
    """How the memory saved in ``directory`` was made, from its description alone (no arrays are read)."""
    path = Path(directory).absolute()
    meta = read_marker(path, MARKER, format=FORMAT, version=VERSION, what="a saved video memory")
    try:
        return _info(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / MARKER}: malformed ({type(e).__name__}: {e})") from e


def _info(meta: dict) -> MemoryInfo:
    info = dict(meta["info"])
    return MemoryInfo(**{**info, **{k: tuple(info[k]) for k in ("frame_indices", "prefix_ids")}})


def _as_tree(cache: LayeredKV) -> dict:
    return {
        "k": {str(i): a for i, a in enumerate(cache.k)},
        "v": {str(i): a for i, a in enumerate(cache.v)},
        "token_index": cache.token_index,
        "lengths": cache.lengths,
    }
