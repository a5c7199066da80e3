"""Model compression: TAT-VPR ternary weights and activation sparsity."""
