"""The first-boot script provision.py writes to a Raspberry Pi OS boot partition: it runs once (from the
kernel command line), sets the host name, the user's ssh key, ssh and the Coral USB rules, then removes
itself from the command line."""

from __future__ import annotations

import shlex

FIRSTRUN_PATH = "/boot/firmware/firstrun.sh"  # where the boot partition is mounted on bookworm
FIRSTRUN_TOKENS = (f"systemd.run={FIRSTRUN_PATH}", "systemd.run_success_action=reboot", "systemd.unit=kernel-command-line.target")
FIRSTRUN_MARKER = "# edgemeta-firstrun"
USB_RULES_NAME = "99-edgetpu-accelerator.rules"


_FIRSTRUN = r"""#!/bin/bash
{marker} (written by edgemeta firmware_tools/provision.py; edits are overwritten)
# systemd runs this once, instead of the normal boot, because cmdline.txt holds
#   {tokens}
# and reboots when it exits 0. It always exits 0: a failed step is logged, not retried.
set -u
ROOT="${{FIRSTRUN_ROOT:-}}"  # empty on the board; tests point it at a fake root folder
BOOT="$ROOT/boot/firmware"
NEW_HOSTNAME={hostname}
FIRST_USER={user}
SSH_KEY={key}
ENABLE_SSH={enable_ssh}
CORAL_USB={coral_usb}
log() {{ echo "firstrun: $*"; }}

# 1. never again: drop our tokens from the one-line cmdline.txt first, so a failure below cannot loop
TOKENS=()
read -r -a TOKENS < "$BOOT/cmdline.txt" || true  # false at EOF without a newline, tokens still read
KEEP=()
for t in "${{TOKENS[@]}}"; do
    t="${{t%$'\r'}}"
    case "$t" in
        {case_tokens}) ;;
        *) KEEP+=("$t") ;;
    esac
done
if [ "${{#KEEP[@]}}" -gt 0 ]; then  # an empty cmdline.txt would not boot: better to run twice
    printf '%s\n' "${{KEEP[*]}}" > "$BOOT/cmdline.txt.new" && sync && mv -f "$BOOT/cmdline.txt.new" "$BOOT/cmdline.txt"
fi

# 2. the first user (the userconfig service would do it only at a normal boot, after us)
if [ -f "$BOOT/userconf.txt" ]; then
    IFS=: read -r UC_USER UC_HASH < "$BOOT/userconf.txt"
    UC_HASH="${{UC_HASH%$'\r'}}"
    if [ -x "$ROOT/usr/lib/userconf-pi/userconf" ]; then
        "$ROOT/usr/lib/userconf-pi/userconf" "$UC_USER" "$UC_HASH"
    else
        {{ id "$UC_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$UC_USER"; }} &&
            printf '%s:%s\n' "$UC_USER" "$UC_HASH" | chpasswd -e
    fi
    if [ $? -eq 0 ]; then
        rm -f "$BOOT/userconf.txt"  # a password hash has no business on a FAT partition
    else
        log "creating user $UC_USER failed; userconf.txt is kept for the userconfig service"
    fi
fi

# 3. hostname
printf '%s\n' "$NEW_HOSTNAME" > "$ROOT/etc/hostname"
if grep -q '^127\.0\.1\.1[[:space:]]' "$ROOT/etc/hosts" 2>/dev/null; then
    sed -i "s/^127\.0\.1\.1[[:space:]].*/127.0.1.1\t$NEW_HOSTNAME/" "$ROOT/etc/hosts"
else
    printf '127.0.1.1\t%s\n' "$NEW_HOSTNAME" >> "$ROOT/etc/hosts"
fi

# 4. SSH
if [ -n "$SSH_KEY" ]; then
    HOME_DIR="$(getent passwd "$FIRST_USER" | cut -d: -f6)"
    if [ -n "$HOME_DIR" ]; then
        SSH_DIR="$ROOT$HOME_DIR/.ssh"
        mkdir -p "$SSH_DIR" && chmod 700 "$SSH_DIR"
        touch "$SSH_DIR/authorized_keys"
        grep -qxF "$SSH_KEY" "$SSH_DIR/authorized_keys" || printf '%s\n' "$SSH_KEY" >> "$SSH_DIR/authorized_keys"
        chmod 600 "$SSH_DIR/authorized_keys"
        chown -R "$FIRST_USER:" "$SSH_DIR" || log "chown failed"
    else
        log "no user $FIRST_USER: SSH key not installed"
    fi
fi
if [ "$ENABLE_SSH" = 1 ]; then
    systemctl enable ssh >/dev/null 2>&1 || log "systemctl enable ssh failed"
fi

# 5. Coral USB Accelerator: udev rules and the plugdev group
if [ "$CORAL_USB" = 1 ] && [ -f "$BOOT/{rules}" ]; then
    mkdir -p "$ROOT/etc/udev/rules.d"
    cp "$BOOT/{rules}" "$ROOT/etc/udev/rules.d/{rules}" && chmod 644 "$ROOT/etc/udev/rules.d/{rules}"
    usermod -aG plugdev "$FIRST_USER" || log "usermod failed"
    rm -f "$BOOT/{rules}"
fi

rm -f "$BOOT/firstrun.sh"
log "done"
exit 0
"""


def firstrun_script(*, hostname: str, user: str, key: str | None, enable_ssh: bool, coral_usb: bool) -> str:
    # every value is validated above and shell-quoted anyway
    return _FIRSTRUN.format(
        marker=FIRSTRUN_MARKER, tokens=" ".join(FIRSTRUN_TOKENS), hostname=shlex.quote(hostname), user=shlex.quote(user),
        key=shlex.quote(key or ""), enable_ssh=int(enable_ssh), coral_usb=int(coral_usb),
        case_tokens="|".join(FIRSTRUN_TOKENS), rules=USB_RULES_NAME)
