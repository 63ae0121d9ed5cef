"""lorasuite_core: the numerics of LoRA adapter migration across base-model upgrades.

Never imports Prefect; the pipeline in ``tasks/`` and ``flows/`` wraps these functions.
"""

__version__ = "0.1.0"
# 2: shared vocabulary prefers ordinary pieces over byte fallbacks (vocab.py); every stage recomputes.
ALGORITHM_VERSION = "2"
