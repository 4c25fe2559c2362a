"""Entry point: `python run_daemon.py --help` (the CLI is daemon/cli.py, the daemon daemon/app.py)."""

import sys

from daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
