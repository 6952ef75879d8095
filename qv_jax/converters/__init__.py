"""Weight converters (installed as ``qv_jax.converters``): Hugging Face safetensors -> NNX state -> orbax."""
