"""How Pilothouse reaches model endpoints over HTTP: the gateway's calls and the operator's health probes alike.

Its own module, outside both planes, because both reach the same endpoints and must agree on how: the operator may
not import the data plane (DESIGN.md §3, ``tests/unit/test_layout.py``), and the data plane shares only the API
types with the operator.
"""

from __future__ import annotations

import functools
import urllib.request

import yarl

KEEPALIVE_EXPIRY_S = 4.0
"""How long an idle pooled connection is kept: under uvicorn's (vLLM's) default 5 s keep-alive timeout, so a
connection the server is just closing is rarely reused."""


@functools.lru_cache(maxsize=4096)
def env_proxy(base_url: str) -> str | None:
    """The proxy ``HTTP(S)_PROXY`` / ``NO_PROXY`` choose for an endpoint, decided once per base URL.

    Managed-inference egress often needs a proxy. aiohttp's ``trust_env`` decides it on every
    request instead, reading the environment and parsing ``~/.netrc`` in a worker thread, twice per
    call: measured, that was a third of the gateway's event-loop time and two thread hand-offs per
    request. A proxy's credentials go in its URL (``http://user:pass@proxy:3128``).
    """
    url = yarl.URL(base_url)
    if url.host is None or urllib.request.proxy_bypass(url.host):
        return None
    return urllib.request.getproxies().get(url.scheme)
