"""``python -m qv_jax.converters HF_DIR OUT_DIR [--dtype ...]``: the same as ``qv-jax convert``."""

import sys

from qv_jax.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
