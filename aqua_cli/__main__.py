"""``python -m aqua_cli``: the CLI, with Ctrl-C during start-up reported like Ctrl-C later."""

import sys

try:
    from .commands import main
except KeyboardInterrupt:
    sys.stderr.write("Aborted!\n")
    sys.exit(130)

main()
