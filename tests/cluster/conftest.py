"""The ``backend`` fixture: a test that uses it runs on the native loops, then on the torch code they replace."""

from __future__ import annotations

import pytest

from torchdkm.cluster import native


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("TORCHDKM_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native" and native.kernels() is None:
        pytest.skip("no native loops here: tests/cluster/test_native.py says whether that is expected")
    return request.param
