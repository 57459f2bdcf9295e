"""Where the shared CT data lie: one setting for the training configs, the tests and the pipelines.

``$CTGRIDIT_DATA`` when it is set, else ``../shared/data/ct`` beside the checkout
(this project's workspace). A training config names its scans as
``$CTGRIDIT_DATA/lidc_idri/...`` (:func:`expand`), so a checkout elsewhere, or
data elsewhere, needs one variable and no edited config; tests that need the
data skip when the folder is absent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The environment variable that names the shared data folder.
DATA_ENV = "CTGRIDIT_DATA"
#: The default: the workspace's shared CT data, beside the repository (meaningful in a checkout, not in an
#: installed package: there set the variable).
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"


def data_folder() -> Path:
    """The shared data folder (``$CTGRIDIT_DATA`` or :data:`DEFAULT_DATA`); it may not exist."""
    value = os.environ.get(DATA_ENV)
    return Path(os.path.expanduser(value)) if value else DEFAULT_DATA


def expand(path: str) -> str:
    """``path`` with ``$CTGRIDIT_DATA`` (or ``${CTGRIDIT_DATA}``) replaced by :func:`data_folder`."""
    return re.sub(r"\$(\{" + DATA_ENV + r"\}|" + DATA_ENV + r"(?![A-Za-z0-9_]))", lambda _: str(data_folder()), path)
