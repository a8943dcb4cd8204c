"""The applications behind the Hydra entry points, side by side (the top layer: nothing in the
library imports them).

* :mod:`drdm.apps.train` — ``src/train.py``: compose, instantiate, fit, test, summarise;
* :mod:`drdm.apps.augment` — ``src/augment.py``: DRDM samples of NIfTI files, resumable;
* :mod:`drdm.apps.evaluate` — ``src/eval.py``: a registration checkpoint on test pairs.
"""
