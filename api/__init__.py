"""budgetpress.api."""
