"""budgetpress: automated compression search for language models under a memory budget."""

from budgetpress._version import __version__

__all__ = ["__version__"]
