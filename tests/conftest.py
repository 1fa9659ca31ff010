"""Test configuration, set before JAX is imported: 8 simulated CPU devices, and compilation made cheaper.

The suite's time is almost all XLA compilation of small programs, so for this run only:

- LLVM compiles at ``-O0`` without its expensive passes (``--xla_backend_optimization_level=0
  --xla_llvm_disable_expensive_passes=true``): about half the compile time. XLA's own HLO passes, sharding
  propagation and buffer assignment are unchanged; the code computes the same float32 operations, it is only less
  optimized machine code (the programs here run for milliseconds).
- JAX's persistent compilation cache, keyed on the program itself, in a directory new for every run and removed at
  its end: a test that builds a new step or ``app.train`` closure compiling an identical program gets it from there
  (JAX's in-memory caches key on the Python function and miss). Subprocesses that the tests start inherit it.

``BSAM_TEST_DEFAULT_XLA=1`` turns both off (the compiler's default optimization, no cache).
"""

import os
import shutil
import tempfile

_flags = ["--xla_force_host_platform_device_count=8"]
_default_xla = os.environ.get("BSAM_TEST_DEFAULT_XLA") == "1"
if not _default_xla:
  _flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + _flags).strip()

if not _default_xla and "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # pytest-xdist workers share the parent's
  _cache_dir = tempfile.mkdtemp(prefix="bsam_optax_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

  def pytest_unconfigure(config):
    shutil.rmtree(_cache_dir, ignore_errors=True)
