"""Small offline assets shipped with lqlr: the stories260K test model and WikiText-2 raw (valid, test).

Both are redistributable (README.md in this folder: sources, checksums, licences: MIT for
stories260K, CC BY-SA 3.0 for WikiText-2). They make the quick experiment, the tests and
WikiText-2 evaluation work with no network. ``$LQLR_ASSETS`` points lqlr at another folder with the
same layout (``stories260K/``, ``wikitext-2-raw/``).
"""
from __future__ import annotations

import os
from pathlib import Path

ASSETS_ENV = "LQLR_ASSETS"
PACKAGED = Path(__file__).resolve().parent


def assets_dir() -> Path:
    """The folder holding ``stories260K/`` and ``wikitext-2-raw/``: ``$LQLR_ASSETS`` when set, else
    the copy inside the package.

    Raises:
        FileNotFoundError: if ``$LQLR_ASSETS`` names a folder that does not exist.
    """
    env = os.environ.get(ASSETS_ENV)
    if not env:
        return PACKAGED
    path = Path(env).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{ASSETS_ENV}={env} is not a folder: point it at a folder holding stories260K/ "
                                f"and wikitext-2-raw/, or unset it to use the copy shipped with lqlr")
    return path
