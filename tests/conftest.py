"""Shared test setup.

* ``MEMATTN_POISON=1``: backends fill their outputs with NaN before computing, so an
  element a kernel forgets to write fails the comparison (design.md §4).
* ``tests/`` is on ``sys.path`` (pytest's rootdir-relative import), so test modules import
  the shared error rule with ``from _errors import check_attention, check_close``.
"""

from __future__ import annotations

import os

os.environ["MEMATTN_POISON"] = "1"
