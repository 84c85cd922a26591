"""Shared fixtures. Eight host CPU devices are forced before JAX starts, for the sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]


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
