"""Shared pytest setup: markers for Neuron/Trn tests and deterministic hypothesis settings."""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _real_nki() -> bool:
    """The real Neuron `nki` package (not our emulator, not the PyPI placeholder)."""
    if importlib.util.find_spec("neuronxcc") is None:
        return False
    try:
        import nki
    except Exception:
        return False
    return not getattr(nki, "__tkg_emulator__", False)


def _trn_device() -> bool:
    """Any /dev/neuron<N> (a pod's device keeps its host index), as backend `nki` looks."""
    from tkg.kernel.backends import neuron_env

    return bool(neuron_env.neuron_devices())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_neuron = pytest.mark.skip(reason="needs the Neuron SDK (nki, neuronx-cc); install the neuron extra on Trn")
    skip_trn = pytest.mark.skip(reason="needs Trainium hardware (a /dev/neuron* device)")
    has_nki, has_trn = _real_nki(), _trn_device()
    for item in items:
        if "neuron" in item.keywords and not has_nki:
            item.add_marker(skip_neuron)
        if "trn" in item.keywords and not has_trn:
            item.add_marker(skip_trn)
