"""Entry point: `python run_daemon.py --help` (see daemon/app.py)."""

import sys

from daemon.app import main

if __name__ == "__main__":
    sys.exit(main())
