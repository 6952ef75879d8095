"""Pallas kernels (installed as ``qv_jax.kernels``), each beside its jnp reference."""
