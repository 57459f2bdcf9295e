"""The ``ctgridit`` console script: starts the command line with nothing heavy imported yet.

Importing the command line pulls in numpy, torch and the rest, which takes a
moment; a Ctrl-C (or SIGTERM, SIGHUP) then must still end in one line and the
signal's exit code, not a traceback from the imports. So the signal handlers
are installed here first (:mod:`ctgridit.signals`), and the import happens
inside the guard.
"""

from __future__ import annotations

import sys

from ctgridit.signals import Stopped, install_handlers


def main(argv: list[str] | None = None) -> None:
    install_handlers()
    try:
        from ctgridit.cli import main as cli_main
    except Stopped as stop:
        print(f"error: {stop.reason}", file=sys.stderr)
        sys.exit(stop.exit_code)
    cli_main(argv)


if __name__ == "__main__":
    main()
