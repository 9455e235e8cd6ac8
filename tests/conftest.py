import faulthandler
import os
import signal
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

CUDA = torch.cuda.is_available()

# Watchdog: a test marked ``@pytest.mark.watchdog(seconds)`` (or a module with
# ``pytestmark = pytest.mark.watchdog(seconds)``) fails with TimeoutError when
# it runs longer than ``seconds``, so a hang fails CI instead of blocking it.
WATCHDOG_SECONDS = 60.0
# SIGALRM only interrupts Python code: a hang inside C code that never returns
# to the interpreter is ended by faulthandler (traceback, then exit) this much later.
WATCHDOG_HARD_GRACE = 30.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "watchdog(seconds=60): fail the test with TimeoutError after `seconds` "
        "(SIGALRM on the main thread; faulthandler ends the run if C code never returns)",
    )


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="module")
def one_thread():
    """torch.set_num_threads(1) for a module of tiny problems (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): intra-op threads only add overhead
    there, and on a loaded two-core machine their spin-waits tripled test_qp's
    time (74 s against 22 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _watchdog(request):
    """Arm the watchdog for tests that carry the ``watchdog`` marker (no-op otherwise)."""
    marker = request.node.get_closest_marker("watchdog")
    usable = (hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if marker is None or not usable:
        yield
        return
    seconds = float(marker.args[0] if marker.args else
                    marker.kwargs.get("seconds", WATCHDOG_SECONDS))
    node = request.node.nodeid

    def on_alarm(signum, frame):
        raise TimeoutError(f"{node} exceeded its {seconds:g} s watchdog")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + WATCHDOG_HARD_GRACE, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
