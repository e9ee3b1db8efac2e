"""`python3 board_ops.pyz COMMAND [ARGS]` (this file is also the zip application's own __main__.py)."""

import sys

from edgemeta.deploy.board.commands import main

main(sys.argv[1:])
