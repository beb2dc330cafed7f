"""Shared fixtures. Tests run offline: nothing may reach the Hub or any dataset server (the fake Hub of
tests/helpers/hub_server.py runs in the test process).

Helpers live in the ``tests.helpers`` package, imported by module path; nothing here edits ``sys.path``.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Fixtures shared by several modules, imported after the offline switches (the helpers import diep_hub).
from tests.helpers.cli_faults import run_folder, untrained_tiny_cli  # noqa: E402, F401  (the CLI fault catalogue's)
from tests.helpers.hub_server import hub_server  # noqa: E402, F401  (the fake Hub, for every test module)


def _pin_tiny_cache() -> None:
    """The README's tiny model is trained once (about a minute) and cached: pin its cache to the user's before a
    test points DIEP_HUB_CACHE at a temporary folder (for the offline corpora), so that every test, and every
    `diep-hub` process a test starts, loads that one build instead of training again. Cache tests pass cache_dir."""
    from diep_hub.tiny import tiny_cache_dir  # after the offline switches above

    os.environ.setdefault("DIEP_HUB_TINY_CACHE", str(tiny_cache_dir()))


_pin_tiny_cache()


@pytest.fixture(autouse=True)
def _library_logging_restored():
    """`diep_hub.cli.main` configures the "diep_hub" logger for a terminal (own handler, no propagation). Put the
    library's own state back (no handler, no level, propagating) after each test, or later tests' caplog would see
    nothing and every "never logged" check would pass vacuously. The state is reset, not restored: a session
    fixture that ran the CLI before this fixture's first save would otherwise be restored too."""
    yield
    root = logging.getLogger("diep_hub")
    root.handlers[:], root.level, root.propagate = [], logging.NOTSET, True


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """Offline corpora are written under DIEP_HUB_CACHE: a folder of the module's own, out of the home folder
    (modules opt in with ``usefixtures``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIEP_HUB_CACHE", str(tmp_path_factory.mktemp("diep-hub-cache")))
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster on one thread than on two contended cores (thread start-up and OpenMP
    spin-waits dominate their small ops); modules that score or search opt in with ``usefixtures``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def calibration_calls(monkeypatch):
    """Every calibration load, as the token tensor it returned: empty proves no work started; a test that recomputes
    errors reads the very tokens the pruner used."""
    import diep_hub.calibration

    calls = []
    original = diep_hub.calibration.load_calibration_data

    def recording(*args, **kwargs):
        ids = original(*args, **kwargs)
        calls.append(ids)
        return ids

    monkeypatch.setattr(diep_hub.calibration, "load_calibration_data", recording)
    return calls
