"""Shared test support: fixtures, oracles, process helpers (no test module imports another)."""
