"""Firmware commands, below the application: prepare a Raspberry Pi boot partition, run a
command on a board's UART console (firmware_tools)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgemeta.cli.app import main, seconds, whole
from edgemeta.errors import EdgemetaError
from edgemeta.limits import BAUD_RANGE


@main.command()
@click.argument("boot", type=click.Path(file_okay=False, exists=True))
@click.option("--hostname", required=True, help="The board's hostname.")
@click.option("--user", required=True, help="First user to create.")
@click.option("--password-env", default=None, metavar="VAR", help="Take the user's password from this environment variable.")
@click.option("--ssh-key", "ssh_key", default=None, type=click.Path(dir_okay=False, exists=True), help="Public key to authorize.")
@click.option("--no-ssh", is_flag=True, help="Do not enable the SSH server.")
@click.option("--no-uart", is_flag=True, help="Do not enable the UART serial console.")
@click.option("--coral", type=click.Choice(["pcie", "usb"]), default=None, help="Settings for a Coral on PCIe or USB.")
def provision(boot: str, hostname: str, user: str, password_env: str | None, ssh_key: str | None, no_ssh: bool, no_uart: bool,
              coral: str | None) -> None:
    """Prepare a mounted Raspberry Pi OS boot partition: UART console, SSH, first user, hostname, Coral settings.

    \b
    Example:
      EDGEMETA_PW=... edgemeta provision /media/$USER/bootfs --hostname kitchen --user pi \\
          --password-env EDGEMETA_PW --ssh-key ~/.ssh/id_ed25519.pub --coral usb
    """
    from firmware_tools.provision import ProvisionError
    from firmware_tools.provision import provision as run_provision

    password = os.environ.get(password_env) if password_env else None
    if password_env and password is None:
        raise EdgemetaError(f"environment variable {password_env} is not set")
    try:
        changes = run_provision(Path(boot), hostname=hostname, user=user, password=password,
                                ssh_pubkey=Path(ssh_key).read_text().strip() if ssh_key else None,
                                enable_ssh=not no_ssh, uart_console=not no_uart, coral=coral)
    except ProvisionError as e:
        raise EdgemetaError(str(e)) from None
    click.echo("\n".join(changes) if changes else "nothing to change: already provisioned")


@main.command()
@click.option("--device", required=True, help="Serial device of the board's console, e.g. /dev/ttyUSB0.")
@click.option("--baud", type=whole(*BAUD_RANGE), default=115200, show_default=True)
@click.option("--user", required=True, help="Login user.")
@click.option("--password-env", required=True, metavar="VAR", help="Environment variable holding the password.")
@click.option("--timeout", type=seconds(0.1, 3600), default=30.0, show_default=True)
@click.argument("command")
def console(device: str, baud: int, user: str, password_env: str, timeout: float, command: str) -> None:
    """Log in on a board's UART console (no network needed) and run one command; exits with its status.

    \b
    Example:
      EDGEMETA_PW=... edgemeta console --device /dev/ttyUSB0 --user pi --password-env EDGEMETA_PW "ip -brief addr"
    """
    from firmware_tools.console import ConsoleError, open_console, run_on_console

    password = os.environ.get(password_env)
    if password is None:
        raise EdgemetaError(f"environment variable {password_env} is not set")
    try:
        port = open_console(device, baud)
    except Exception as e:
        raise EdgemetaError(f"cannot open {device}: {e}") from None
    try:
        status, output = run_on_console(port, user, password, command, timeout=timeout)
    except ConsoleError as e:
        raise EdgemetaError(str(e)) from None
    finally:
        port.close()
    click.echo(output, nl=False)
    sys.exit(status)
