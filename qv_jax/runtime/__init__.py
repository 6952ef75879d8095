"""Jitted, static-shape prefill and decode steps, the generation loop, and :func:`load_model`."""

from qv_jax.runtime import steps
from qv_jax.runtime.sampling import SamplingParams
from qv_jax.runtime.vlm import VisionLanguageModel, load_model

__all__ = ["SamplingParams", "VisionLanguageModel", "load_model", "steps"]
