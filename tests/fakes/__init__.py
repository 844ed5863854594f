"""Controllable stand-ins for the things the gateway talks to, for unit, integration and fault tests."""
