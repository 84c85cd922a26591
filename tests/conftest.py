"""Shared fixtures. Eight host CPU devices are forced before JAX starts, for the sharding tests.

The suite is bound by compiling programs that run for milliseconds, so two compiler settings
make XLA compile faster, inherited by the pytest-xdist workers and the scripts the tests start:
its most expensive optimisations are off (`jax_disable_most_optimizations`; about a fifth less
time), and the CPU backend emits fusions with its older elemental emitter rather than the newer
MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`; the suite then took 10 min 20 s
against 14 min 43 s). The programs compute the same functions (the tests' tolerances are
unchanged); the benchmarks and users' runs keep XLA's defaults. JAX_DISABLE_MOST_OPTIMIZATIONS=0
and an XLA_FLAGS of one's own (it replaces these flags, the forced 8 devices included) undo
them."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole run, in a fresh temporary folder shared
  by the pytest-xdist workers and the scripts the tests start (they inherit the environment):
  many tests compile a program that another test, a resumed run or a second seed has compiled
  already, and read it back instead. Nothing outlives the run. TRUSTJAX_TEST_XLA_CACHE=0 turns it
  off; a JAX_COMPILATION_CACHE_DIR set by the caller is used as it is."""
  if (hasattr(config, "workerinput") or os.environ.get("TRUSTJAX_TEST_XLA_CACHE") == "0"
      or "JAX_COMPILATION_CACHE_DIR" in os.environ):
    return  # a worker (its master made the folder), turned off, or the caller's own cache
  import tempfile  # pylint: disable=import-outside-toplevel
  config.trustjax_xla_cache = tempfile.mkdtemp(prefix="trustjax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = config.trustjax_xla_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  # op names and source lines in the key: an executable read back carries its own metadata
  # (the profiler splits steps by op names; a test compares HLO with and without named scopes)
  os.environ.setdefault("JAX_COMPILATION_CACHE_INCLUDE_METADATA_IN_KEY", "true")


def pytest_unconfigure(config):
  folder = getattr(config, "trustjax_xla_cache", None)
  if folder:
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(folder, ignore_errors=True)
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)


def load_file(relative: str):
  """The module in REPO/`relative` (a script or a config file), loaded by its path."""
  path = REPO / relative
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shared_data(name: str) -> pathlib.Path:
  """A dataset of ../shared/data (or $TRUSTJAX_SHARED_DATA); skipped outside CI when absent."""
  root = pathlib.Path(os.environ.get("TRUSTJAX_SHARED_DATA", REPO.parent / "shared" / "data"))
  path = root / name
  if not path.exists():
    if os.environ.get("CI"):
      raise FileNotFoundError(f"{path} is required in CI")
    pytest.skip(f"shared dataset {path} not present")
  return path


@pytest.fixture
def snips_dir():
  return shared_data("snips")


@pytest.fixture
def interactive_sigint():
  """SIGINT raising KeyboardInterrupt, as in Python started from a terminal, whatever the test
  process inherited (a job started in the background begins with SIGINT ignored, as CI's is)."""
  import signal  # pylint: disable=import-outside-toplevel
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def override(cfg, **overrides):
  """Sets dotted config fields ("fl.rounds"=3) on `cfg` itself (unlocked, then locked again) and
  returns it."""
  cfg.unlock()
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  cfg.lock()
  return cfg


def tiny_bert_checkpoint(path):
  """A Hugging Face BERT checkpoint folder (config.json, model.safetensors) with random weights
  and all-MiniLM-L6-v2's tokenizer.json: small enough for a test run."""
  import shutil  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  from trustjax import models  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
  BertModel(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
  shutil.copy(os.path.join(models.minilm_path(), "tokenizer.json"), path)
  return str(path)
