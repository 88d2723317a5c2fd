"""Shared fixtures: composed configs, a per-session cache, the real images when available."""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cxr.config import CONF_DIR, register_configs

register_configs()  # the schema and resolvers, as the entry points register them
REPO = Path(__file__).resolve().parents[1]


# Under pytest-xdist (`make test` runs two workers, one per core) each worker process trains on one
# CPU thread, and so do the commands it starts: two processes of two threads each on two cores
# mostly wait for each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """One cache for the session: the embedded dataset is generated and decoded once.

    xdist's workers share it (a lock lets the first build what the others then read).
    """
    path = os.environ.get("CXR_CACHE_DIR")
    if not path and os.environ.get("PYTEST_XDIST_WORKER"):
        path = str(tmp_path_factory.getbasetemp().parent / "cxr-cache")
    path = path or str(tmp_path_factory.mktemp("cache"))
    os.environ["CXR_CACHE_DIR"] = path
    return Path(path)


@pytest.fixture(scope="session")
def make_cfg():
    """Compose conf/train.yaml with overrides, as `python -m cxr.train` would; any scope uses it."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real Kaggle images) through CXR_SHARED_DATA; skip when it is unset, except
    under CI=true: there a missing dataset fails the test, so CI never goes green without the
    real-radiograph checks (.ci/run sets CXR_SHARED_DATA)."""
    root = os.environ.get("CXR_SHARED_DATA")
    if not root or not Path(root, "cxr-real").is_dir():
        reason = "CXR_SHARED_DATA is not set to the folder holding cxr-real/ and cxr-fullres/"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the real-radiograph tests must run)", pytrace=False)
        pytest.skip(reason)
    return Path(root)


@pytest.fixture(scope="session")
def embedded_root(make_cfg, cache_dir) -> Path:
    """The embedded dataset's folder, generated on first use (tests copy images out of it)."""
    from cxr.synthetic import ensure_synthetic

    data = make_cfg().data
    return ensure_synthetic(data.root, data.synthetic)
