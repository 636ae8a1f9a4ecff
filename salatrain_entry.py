"""The ``salatrain`` console command.

Loading the CLI imports torch and transformers (seconds). A Ctrl-C in that time, or before the command's own
interrupt handling starts, ends like any other interrupt: exit status 130 and one line, not a traceback. It
lives outside the ``salatrain`` package because importing anything inside it starts that same import.
"""

import sys


def main() -> int:
    try:
        from salatrain.cli import main as cli_main
    except KeyboardInterrupt:
        print("salatrain: interrupted while starting; nothing was run", file=sys.stderr)
        return 130
    try:
        return cli_main()
    except KeyboardInterrupt:  # outside the command's own handling (argument parsing, start-up, exit)
        print("salatrain: interrupted; nothing was committed after the interrupt", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
