"""The ``backend`` fixture: a test that uses it runs on the native loops, then on the torch kernels."""

from __future__ import annotations

import pytest

from torchdkm.kernels import native_available


@pytest.fixture(params=["native", "torch"])
def backend(request):
    if request.param == "native" and not native_available():
        pytest.skip("no native loops here: tests/cluster/test_native.py says whether that is expected")
    return request.param
