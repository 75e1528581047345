"""Helpers the serving tests share: a free loopback port, a digits V2 body, and a burst of requests
released at the same moment."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits_v2(rows: list) -> dict:
    return {"inputs": [{"name": "features", "shape": [len(rows), 64], "datatype": "FP32",
                        "data": [x for r in rows for x in r]}]}


def together(fn: Callable[[Any], Any], items: list) -> list:
    """fn over items from one thread each, released at the same moment, so the requests queue behind
    each other in the replica (a batch forms from what is queued when the engine is free)."""
    start = threading.Barrier(len(items))

    def call(item):
        start.wait()
        return fn(item)

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(call, items))
