"""Pallas kernels (installed as ``qv_jax.kernels``), each beside its jnp reference.

Shapes use the project's letters (docs/architecture.md): B batch, T query tokens, S key slots, N query heads, K KV
heads, G = N / K, H head dim. ``Tp`` / ``Sp`` / ``Hp`` are T / S / H padded for a kernel; other sizes are named in
full (``pages``, ``page_size``, ``listed`` pages, ``logical_pages``, table ``rows``, ``q_blocks``, ``kv_blocks``).
"""
