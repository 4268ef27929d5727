"""budgetpress.kernels."""
