"""Run a child as root that obeys file modes, for the tests of unwritable directories."""

from __future__ import annotations

import ctypes


def as_plain_user() -> None:
    """preexec_fn: drop the capabilities that let root ignore file modes (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH, CAP_FOWNER) from the bounding set; after exec root obeys chmod."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "cannot drop a capability")
