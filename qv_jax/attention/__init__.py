"""Every attention in qv-jax goes through this package.

``dot_product_attention`` is the dense jnp reference (the ``xla`` backend and the oracle for tests); the block-
sparse patterns and their Pallas kernels plug in behind the same arguments.
"""

from qv_jax.attention.dense import attention_mask, dot_product_attention

__all__ = ["attention_mask", "dot_product_attention"]
