"""Optional dependencies, each behind an extra of the package: the commands that need one say
which extra to install instead of failing on an import.

- ``lina[plots]``: matplotlib, for the PNG written beside each JSON result;
- ``lina[cluster]``: pyroute2, for the emulated multi-host cluster.
"""

from __future__ import annotations

import importlib.util
import sys

EXTRAS = {"matplotlib": "plots", "pyroute2": "cluster"}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def install_hint(module: str) -> str:
    """``pip install 'lina[EXTRA]'`` for the extra that brings ``module``."""
    return f"pip install 'lina[{EXTRAS[module]}]'"


def can_plot(png: str | object = "the plot") -> bool:
    """Whether matplotlib is there; if not, a one-line note on stderr naming the PNG skipped and the
    extra to install."""
    if installed("matplotlib"):
        return True
    print(f"lina: note: {png} not drawn: matplotlib is not installed ({install_hint('matplotlib')})", file=sys.stderr)
    return False


def pyplot(png: str | object = "the plot"):
    """matplotlib's pyplot on the file-only Agg backend, or None after a one-line note on stderr
    naming the PNG skipped and the extra to install (a result is never lost for want of a plot)."""
    if not can_plot(png):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
