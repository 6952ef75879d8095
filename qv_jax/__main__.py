import sys

from qv_jax.cli import main

sys.exit(main())
