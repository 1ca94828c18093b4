"""The shared fixtures and the tier markers live in tests/helpers/ (plain code the tests import from there too).

One torch (OpenMP) thread per process, for the tests and every process they start (before torch is imported): the
suite runs three pytest processes, each with workers of its own, on a 2-core machine, and with a thread per core
each, OpenMP's spinning threads fight over the cores (three copies of test_continuous_batching.py side by side:
133 s with torch's default, 58 s with one thread). A given OMP_NUM_THREADS is kept."""

import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ctrl-C tests send SIGINT to the CLI. A shell without job control starts a background job (`make test &`) with
# SIGINT ignored, which its children inherit (and then Python installs no KeyboardInterrupt): give them the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["helpers.fixtures", "helpers.tiers", "helpers.order"]
