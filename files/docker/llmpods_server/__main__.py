"""Entry point: ``python3 -m llmpods_server``."""

import signal
import sys


def _stop(_signum, _frame):
    sys.exit(0)


# In a container this process is PID 1, and the kernel gives PID 1 no signal it has no handler for. Until uvicorn
# serves (and installs its own, graceful handler), a SIGTERM would be lost: a pod deleted while its model loads (a
# scale to zero, a rollout) would then wait out its whole termination grace period. This one stops the server as
# soon as the running import or model load returns.
signal.signal(signal.SIGTERM, _stop)

from llmpods_server.server import main  # noqa: E402

if __name__ == "__main__":
    main()
