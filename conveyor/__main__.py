import signal
import sys


def _exit_cleanly(signum: int, frame: object) -> None:
    # SIGTERM before the server's own handlers are in (imports, model load): a clean exit, not -15.
    raise SystemExit(0)


signal.signal(signal.SIGTERM, _exit_cleanly)

from conveyor.runtime.cli import main  # noqa: E402  (after the handler: this import takes a second or more)

sys.exit(main())
