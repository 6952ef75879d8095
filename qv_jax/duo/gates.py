"""Identified gates: DuoAttention's ``full_attention_heads.tsv`` (one row per layer, a tab-separated gate per KV
head), written whole or not at all, with a heat map of the gates beside it. See docs/duo.md."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from qv_jax.attention.heads import TSV_NAME
from qv_jax.errors import InputError
from qv_jax.marker import atomic_output, check_output


@dataclasses.dataclass(frozen=True)
class HeadGates:
    """``gates`` float32 ``[layers, kv_heads]`` in [0, 1] (high = retrieval head), the loss of every step run
    (``losses``, empty for the training-free method) and the ``method`` that made them."""

    gates: np.ndarray
    losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    method: str = "optimize"

    def __post_init__(self):
        gates = np.asarray(self.gates, np.float32)
        if gates.ndim != 2 or gates.size == 0:
            raise InputError(f"gates must be [layers, kv_heads], got shape {gates.shape}")
        object.__setattr__(self, "gates", gates)
        object.__setattr__(self, "losses", np.asarray(self.losses, np.float32))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``full_attention_heads.tsv`` (``path`` is the file or its directory) and the heat map beside it;
        returns the tsv's path. Existing files are replaced only with ``overwrite``."""
        tsv = Path(path)
        if tsv.suffix != ".tsv":
            tsv = tsv / TSV_NAME
        png = tsv.with_suffix(".png")
        check_output(png, overwrite=overwrite, directory=False)  # both refused before either is written
        with atomic_output(tsv, overwrite=overwrite, directory=False) as partial:
            np.savetxt(partial, self.gates, fmt="%.6f", delimiter="\t")
        with atomic_output(png, overwrite=overwrite, directory=False) as partial:
            self._heat_map(partial)
        return tsv

    def _heat_map(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.ticker import MaxNLocator

        layers, heads = self.gates.shape
        fig, ax = plt.subplots(figsize=(max(3.0, 0.4 * heads + 1.5), max(2.5, 0.25 * layers + 1)))
        image = ax.imshow(self.gates, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title(f"DuoAttention gates ({self.method})")
        fig.colorbar(image, ax=ax, label="gate (1 = retrieval)")
        fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
