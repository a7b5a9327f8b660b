"""Fixtures of the discovery tests (the collections themselves are in discovery_collections)."""

from discovery_collections import epics_env, sim_collection

__all__ = ["epics_env", "sim_collection"]
