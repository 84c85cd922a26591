"""trustjax: trustworthy NLP in JAX.

Pure functions over pytrees for differentially private training, privacy attacks, federated
learning simulation and fairness metrics. Nothing here does I/O at import time.
"""

__version__ = "0.1.0"
