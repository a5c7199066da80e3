"""Compression to a latency budget (``budget``: `edgevpr compress`). The method parts it orchestrates live with the
models: TAT-VPR's ternary layers in ``models/ternary.py``, WeiToP pruning in ``models/pruning.py``."""
