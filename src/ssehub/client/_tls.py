from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default certificate verification, made once per process.

    Loading the CA bundle costs 100-300 ms; an httpx client made per stream would pay it
    on every `connect()`, before the first byte is even sent.
    """
    return httpx.create_ssl_context()
