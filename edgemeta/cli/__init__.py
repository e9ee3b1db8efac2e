"""The `edgemeta` command line. Commands are thin: parse, call the library, print.

One click group, `main` (app.py, with the error handling every command shares; common.py: the
options and output the board's commands and `remote` share); the commands are in one module per
audience, imported here so that they register:
    host.py      train, eval, export, inspect, edgetpu (the host with TensorFlow; inspect and edgetpu need none)
    data.py      data speech (synthetic spoken words for keyword models)
    board.py     enroll, calibrate, classify, listen, classes, forget, rename, new-store, adapt, reenroll, demo, health,
                 serve (the board: runtime only, never TensorFlow)
    remote.py    remote: the board's commands through its agent (ssh, socket, serial)
    fleet.py     boards, keygen, bundle, deploy, rollback, status, doctor (reaching boards from the host)
    firmware.py  provision, console (below the application: boot partition, UART console)
Every module imports its library lazily, inside the commands, so `edgemeta --help` and the board's
commands start without TensorFlow.
"""

from edgemeta.cli import board, data, firmware, fleet, host, remote  # noqa: F401  (remote after fleet: its group)
from edgemeta.cli.app import Finite, main, seconds, whole
from edgemeta.cli.common import describe_head

__all__ = ["Finite", "describe_head", "main", "seconds", "whole"]
