"""The training seed of the learning tests, so that their spread over seeds can be measured.

``MTSSL_LEARNING_SEED`` (default 0) seeds the training (initial weights, training crops and task
randomness) of every learning test; the evaluation crops keep their own fixed seeds. The spread
each test's docstring states was measured with::

    for s in 0 1 2 3 4; do MTSSL_LEARNING_SEED=$s .venv/bin/python -m pytest -s -q -m slow -k learns tests/tasks; done
"""

from __future__ import annotations

import os


def learning_seed() -> int:
    """``MTSSL_LEARNING_SEED`` as an int (0 when unset)."""
    return int(os.environ.get("MTSSL_LEARNING_SEED", "0"))
