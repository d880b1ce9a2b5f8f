"""``diffusekit app``: a local web page over a trained run (the optional ``app`` extra).

The page samples, restores and evaluates a run through the same library calls as the command line
(``runs.sample.sample_run``, ``runs.restore.restore_run``, ``runs.evaluate.evaluate_run``), so its
results equal ``diffusekit sample`` / ``restore`` / ``evaluate`` for the same settings and seeds.

- ``actions``: the page's requests (JSON values) -> typed settings -> those calls, into a temporary folder;
- ``jobs``: one job at a time in a worker thread, its state for the page to poll;
- ``server``: the Starlette routes and ``serve`` (uvicorn), bound to 127.0.0.1 by default;
- ``static/``: the page itself, plain HTML and vanilla JavaScript, nothing fetched from elsewhere.

This module is torch- and Starlette-free: ``missing_extra`` tells the command line whether the extra
is installed before anything heavy is imported.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_PACKAGES", "INSTALL_HINT", "missing_extra"]

EXTRA_PACKAGES = ("starlette", "uvicorn")  # what ``pip install 'diffusekit[app]'`` brings
INSTALL_HINT = "pip install 'diffusekit[app]'"


def missing_extra() -> str | None:
    """The first package of the ``app`` extra that is not installed, or None."""
    for name in EXTRA_PACKAGES:
        if importlib.util.find_spec(name) is None:
            return name
    return None
