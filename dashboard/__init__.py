"""budgetpress.dashboard."""
