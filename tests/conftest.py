"""Shared test set-up: float32 matmuls at full precision so parity checks against PyTorch are meaningful, one
persistent XLA compilation cache for the whole run, and the tiny ``VideoQA`` and its memory that several test
modules use.

Much of the suite's time is XLA compiling the same tiny-model steps again in every process that needs them (the
CLI, docs, notebook and mesh tests run in subprocesses). The cache directory is made once, by the first process
that loads this file, and handed to every later one through the environment (``JAX_COMPILATION_CACHE_DIR``, which
jax reads when it is imported); that process removes it at the end. A cache directory the caller set already is
used as it is and kept. The same goes for pytest-xdist's workers (pyproject.toml runs two): the controlling
process loads this file first, and the workers it starts inherit its environment, so all of them share one cache.
"""

import gc
import os
import shutil
import tempfile

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qv-jax-tests-xla-cache-")
    _OWNED_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWNED_CACHE = None
# the tiny models' steps compile in a fraction of a second each, but there are thousands of them
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # after the environment above, which jax reads when imported

jax.config.update("jax_default_matmul_precision", "highest")


# The test files that take a minute or more (a subprocess on 8 host devices, the docs runner, the benchmarks on a
# tiny preset, the notebooks, the mesh pipeline), longest first: the two workers take whole files in collection
# order, and one of these started last would run alone while the other worker has nothing left.
LONGEST_FIRST = ("test_sharding.py", "test_benchmarks.py", "test_docs.py", "test_notebooks.py", "test_videoqa_mesh.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each module's compiled programs when it ends: every executable XLA's CPU backend loads holds memory
    maps of its own, and one process running the whole suite otherwise passes the kernel's limit of 65,530 maps
    (``vm.max_map_count``), where the next compilation crashes. A later module needing the same program loads it
    back from the compilation cache above."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def qa():
    """The tiny model's ``VideoQA`` (groups of 8 frames, half of each group kept), shared by the test modules."""
    from pipeline_helpers import VIDEO_OPTIONS, tiny_model

    import qv_jax

    return qv_jax.VideoQA(tiny_model(), group_frames=8, retention=0.5, **VIDEO_OPTIONS)


@pytest.fixture(scope="session")
def memory(qa):
    """The sample video's memory, encoded once for the run (answers work on copies of it)."""
    from pipeline_helpers import sample_video

    return qa.encode(sample_video())


def pytest_unconfigure(config):
    if _OWNED_CACHE is not None:
        shutil.rmtree(_OWNED_CACHE, ignore_errors=True)
