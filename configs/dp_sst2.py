"""DP sentiment classification on GLUE SST-2 through `tfds.data_source` (TensorFlow not needed).

Prepare the data once where TFDS can download it:
  tfds build glue/sst2 --data_dir ~/tfds --file_format array_record
then:
  python scripts/train.py --config configs/dp_sst2.py --config.data.data_dir=$HOME/tfds
"""

from trustjax.experiments import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.data.name = "tfds"
  c.data.tfds_name = "glue/sst2"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.max_length = 48
  c.data.vocab_size = 16384
  c.dp.target_epsilon = 8.0
  c.train.batch_size = 1024
  c.train.epochs = 3.0
  c.train.run_name = "dp_sst2"
  if arg == "runlocal":
    c.data.max_examples = 64
    c.train.batch_size = 16
    c.train.epochs = 1.0
    c.dp.accountant = "rdp"
    c.train.measure_step_time = False
  c.lock()
  return c
