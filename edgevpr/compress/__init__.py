"""Model compression: TAT-VPR ternary weights and activation sparsity; ``budget``: `edgevpr compress`."""
