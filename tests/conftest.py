import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. Triton reads this when a kernel is defined,
# so it must be set before swa_rewrite's kernel modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed on failure), so inputs are random but a failure can be replayed:
    ``SWA_TEST_SEED=<seed> pytest <test>``."""
    value = int(os.environ.get("SWA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


# Test-only references (e.g. mla_reference.py) live beside this file.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden graph-diff files under tests/golden instead of comparing")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
