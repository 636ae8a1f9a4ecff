"""The ``salatrain`` console command.

Loading the CLI imports torch and transformers (seconds; `salatrain --help` skips them). A Ctrl-C in that
time, or before the command's own interrupt handling starts, ends like any other interrupt: exit status 130 and
one line, not a traceback. It lives outside the ``salatrain`` package because importing anything inside it
starts that same import.
"""

import os
import sys

HELP = ("-h", "--help", "help")


def main() -> int:
    args = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    if not args or args[0] in HELP:  # the command list only: no model classes, no torch (salatrain/__init__.py)
        os.environ["SALATRAIN_HELP_ONLY"] = "1"
    try:
        from salatrain.cli import main as cli_main
    except KeyboardInterrupt:
        print("salatrain: interrupted while starting; nothing was run", file=sys.stderr)
        return 130
    finally:
        os.environ.pop("SALATRAIN_HELP_ONLY", None)  # read once, at the package's import: no child inherits it
    try:
        return cli_main()
    except KeyboardInterrupt:  # outside the command's own handling (argument parsing, start-up, exit)
        print("salatrain: interrupted; nothing was committed after the interrupt", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
