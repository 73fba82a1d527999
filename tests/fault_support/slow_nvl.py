"""Run ``nvl ARGS...`` with every tensor a conversion writes slowed down (``NVL_TEST_DELAY`` seconds each),
so that a test can signal or kill it while it writes; nothing else is changed."""

import os
import sys
import time

from nvlcore.convert import engine

delay = float(os.environ.get("NVL_TEST_DELAY", "0.05"))
update = engine.Progress.update


def slow_update(self, nbytes, key=""):  # noqa: ANN001
    time.sleep(delay)
    return update(self, nbytes, key)


engine.Progress.update = slow_update

from nvlcore.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
