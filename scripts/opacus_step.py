"""Times one Opacus DP-SGD step (and a plain PyTorch step) for benchmark_dp.py; run in its own
process so PyTorch and JAX do not share threads.

  python scripts/opacus_step.py --case mlp --repeats 10

Prints one JSON line: {"case", "nondp_ms", "hooks_ms", "ghost_ms", "torch", "opacus"}. The models
mirror benchmark_dp.py's: the MLP 784-512-512-10 and a pre-LN transformer encoder classifier
(token + position embeddings, blocks of LayerNorm -> multi-head self-attention -> residual,
LayerNorm -> GELU MLP (4x) -> residual, final LayerNorm, masked mean pooling, linear head), with
attention built from nn.Linear layers (see `Attention`).
Same optimizer (Adam), batch and sequence length. CPU threads = the machine's cores.
"""

import argparse
import json
import time

import numpy as np
import opacus
import torch


class MLP(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(),
                                   torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                   torch.nn.Linear(512, 10))

  def forward(self, x):
    return self.net(x)


class Attention(torch.nn.Module):
  """Multi-head self-attention from four nn.Linear layers, batch first (Flax's layout). Opacus
  1.6's DPMultiheadAttention(batch_first=True) reshapes its [batch * heads, length, head_dim]
  output straight to [batch, length, dim], mixing heads and positions, and its sequence-first form
  breaks Opacus's batch-first per-sample hooks; nn.Linear layers are handled natively by both
  Opacus modes."""

  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.q, self.k, self.v, self.out = (torch.nn.Linear(d, d) for _ in range(4))

  def forward(self, x, pad):
    b, t, d = x.shape
    split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    s = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    return self.out((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, d))


class Block(torch.nn.Module):

  def __init__(self, d, heads):
    super().__init__()
    self.ln1 = torch.nn.LayerNorm(d)
    self.attn = Attention(d, heads)
    self.ln2 = torch.nn.LayerNorm(d)
    self.mlp_in = torch.nn.Linear(d, 4 * d)
    self.mlp_out = torch.nn.Linear(4 * d, d)

  def forward(self, x, pad):
    x = x + self.attn(self.ln1(x), pad)
    return x + self.mlp_out(torch.nn.functional.gelu(self.mlp_in(self.ln2(x))))


class Encoder(torch.nn.Module):

  def __init__(self, vocab, seq, d, layers, heads, classes=2):
    super().__init__()
    self.tok = torch.nn.Embedding(vocab, d)
    self.pos = torch.nn.Embedding(seq, d)
    self.blocks = torch.nn.ModuleList([Block(d, heads) for _ in range(layers)])
    self.ln = torch.nn.LayerNorm(d)
    self.head = torch.nn.Linear(d, classes)

  def forward(self, tokens):
    pad = tokens == 0
    pos = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    x = self.tok(tokens) + self.pos(pos)
    for blk in self.blocks:
      x = blk(x, pad)
    x = self.ln(x)
    m = (~pad).float().unsqueeze(-1)
    return self.head((x * m).sum(1) / m.sum(1).clamp(min=1.0))


CASES = {
    "mlp": (lambda: MLP(), 256, None),
    "encoder": (lambda: Encoder(10000, 64, 128, 2, 4), 32, 64),
    "encoder256": (lambda: Encoder(10000, 64, 128, 2, 4), 256, 64),
    "encoder_large": (lambda: Encoder(10000, 128, 256, 4, 4), 64, 128),
}


def _data(case, batch, seq):
  g = torch.Generator().manual_seed(0)
  if seq is None:
    x = torch.randn(batch, 784, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
  else:
    x = torch.randint(1, 10000, (batch, seq), generator=g)
    y = torch.randint(0, 2, (batch,), generator=g)
  return x, y


def _time(step, repeats):
  for _ in range(2):
    step()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    step()
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts)) * 1e3


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--case", choices=list(CASES), required=True)
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args()
  build, batch, seq = CASES[args.case]
  x, y = _data(args.case, batch, seq)
  dataset = torch.utils.data.TensorDataset(x, y)
  out = {"case": args.case, "torch": torch.__version__, "opacus": opacus.__version__,
         "threads": torch.get_num_threads()}

  torch.manual_seed(0)
  model = build()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = torch.nn.CrossEntropyLoss()

  def plain():
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()

  out["nondp_ms"] = _time(plain, args.repeats)

  for mode in ("hooks", "ghost"):
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    engine = opacus.PrivacyEngine()
    made = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                               criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0,
                               max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
    if mode == "ghost":
      dp_model, dp_opt, criterion, _ = made
    else:
      dp_model, dp_opt, _ = made
      criterion = torch.nn.CrossEntropyLoss()

    def step(dp_model=dp_model, dp_opt=dp_opt, criterion=criterion):
      dp_opt.zero_grad()
      criterion(dp_model(x), y).backward()
      dp_opt.step()

    out[f"{mode}_ms"] = _time(step, args.repeats)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
