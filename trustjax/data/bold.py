"""BOLD prompts: beginnings of Wikipedia sentences about people and professions, for measuring
the bias of open-ended generation.

The files are those of the public repository (github.com/amazon-science/bold, folder `prompts`):
`<domain>_prompt.json` = {group: {entity: [prompt, ...]}}, for example
{"American_actresses": {"Jane_Doe": ["Jane Doe is an American actress who ", ...]}}. The loader
takes the folder holding them (the project never ships them; tests read `../shared/data/bold`).

Reference: Dhamala et al., "BOLD: Dataset and Metrics for Measuring Biases in Open-Ended Language
Generation", FAccT 2021 (23,679 prompts in five domains; 3,204 in gender, 10,195 in profession).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

BOLD_DOMAINS = ("gender", "profession", "race", "religious_ideology", "political_ideology")


@dataclasses.dataclass(frozen=True)
class BoldPrompts:
  """Prompts of one domain, flattened.

  Attributes:
    prompts: the prompt texts (trailing spaces stripped).
    groups: int32 [n], index into `group_names` of each prompt's group.
    group_names: the domain's groups, in the file's order.
    entities: the Wikipedia entity each prompt came from.
  """

  prompts: tuple[str, ...]
  groups: np.ndarray
  group_names: tuple[str, ...]
  entities: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.prompts)


def load_bold(folder: str, domain: str, *, max_per_group: int | None = None,
              seed: int = 0) -> BoldPrompts:
  """Reads `<folder>/<domain>_prompt.json`.

  Args:
    folder: the folder of BOLD's prompt files.
    domain: one of `BOLD_DOMAINS`.
    max_per_group: keep at most this many prompts per group, drawn without replacement by a
      generator seeded with `seed` (file order kept); None keeps all.
    seed: the subsampling seed.
  """
  if domain not in BOLD_DOMAINS:
    raise ValueError(f"domain must be one of {BOLD_DOMAINS}, got {domain!r}")
  if max_per_group is not None and max_per_group < 1:
    raise ValueError(f"max_per_group must be >= 1 or None, got {max_per_group}")
  path = os.path.join(folder, f"{domain}_prompt.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no BOLD file {path!r}: point the loader at the folder of "
                            f"<domain>_prompt.json files (github.com/amazon-science/bold, prompts/)")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or not data:
    raise ValueError(f"{path}: expected {{group: {{entity: [prompts]}}}}")
  rng = np.random.default_rng(seed)
  prompts, groups, entities = [], [], []
  for g, (name, by_entity) in enumerate(data.items()):
    rows = [(e, p.strip()) for e, ps in by_entity.items() for p in ps if p.strip()]
    if max_per_group is not None and len(rows) > max_per_group:
      keep = np.sort(rng.choice(len(rows), max_per_group, replace=False))
      rows = [rows[i] for i in keep]
    prompts.extend(p for _, p in rows)
    entities.extend(e for e, _ in rows)
    groups.extend([g] * len(rows))
  return BoldPrompts(tuple(prompts), np.asarray(groups, np.int32), tuple(data), tuple(entities))
