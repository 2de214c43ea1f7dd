"""How ManagerService tells a supervisor to slow down, written once for both sides (docs/protocols.md).

A call over its node's rate is answered RESOURCE_EXHAUSTED, with the seconds until it may succeed in the
trailing metadata ``RETRY_AFTER_KEY`` (decimal text). The Manager sets it (manager/ratelimit.py); the
supervisor waits at least that long before it calls again (supervisor/manager_client.py).
"""

from __future__ import annotations

import math
from typing import Any

import grpc

RETRY_AFTER_KEY = "baton-retry-after-s"
MAX_RETRY_AFTER_S = 300.0  # a hint beyond this (or garbage) is not trusted further


def retry_after_s(error: grpc.RpcError) -> float:
    """The wait a RESOURCE_EXHAUSTED answer asked for; 0.0 for any other error or without a usable hint."""
    call: Any = error  # a grpc.Call (sync) or AioRpcError: code() and trailing_metadata() of (key, value) pairs
    if call.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 0.0
    for key, value in call.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                hint = float(value)
            except (TypeError, ValueError):
                return 0.0
            return min(hint, MAX_RETRY_AFTER_S) if math.isfinite(hint) and hint > 0 else 0.0
    return 0.0
