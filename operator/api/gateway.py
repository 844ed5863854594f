"""How a gateway process is started: the settings the operator renders into gateway pods and that
``pilothouse serve`` applies itself. Here, beside the RoutingTable, because both sides need them and
neither may import the other (DESIGN.md §3)."""

from __future__ import annotations

THROUGHPUT_OPTIMIZED_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
"""Serve's throughput-optimized preset with HAProxy on the Serve port instead of Serve's Python proxy:
3x the requests per second (bench/README.md)."""

STORE_URL_ENV = "PILOTHOUSE_STORE_URL"
"""The store's SQLAlchemy URL when none is passed: read by ``pilothouse serve --store-url`` and by the gateway app."""
