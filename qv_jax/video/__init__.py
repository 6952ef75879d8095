"""QuickDecoder: exact, parallel, keyframe-aligned video decoding into shared memory.

No JAX import here except inside ``prefetch``: decoder worker processes import this package.
"""
