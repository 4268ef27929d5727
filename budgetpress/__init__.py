"""budgetpress: automated compression search for language models under a memory budget."""

from typing import TYPE_CHECKING, Any

from budgetpress._version import __version__

if TYPE_CHECKING:
    from budgetpress.evaluators import load_compressed

__all__ = ["__version__", "load_compressed"]


def __getattr__(name: str) -> Any:
    # ``load_compressed`` needs torch and transformers; importing them lazily keeps ``import budgetpress``
    # (the CLI's first import, and the pure-Python space package) light.
    if name == "load_compressed":
        from budgetpress.evaluators import load_compressed

        return load_compressed
    raise AttributeError(f"module 'budgetpress' has no attribute {name!r}")
