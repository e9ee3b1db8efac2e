"""Class labels: what an operator may call a class (printed by every command, kept as data, never a file name)."""

from __future__ import annotations

import unicodedata

from edgemeta.errors import EdgemetaError

MAX_LABEL = 128


def check_label(label: str) -> str:
    label = label.strip() if isinstance(label, str) else ""
    if not label:
        raise EdgemetaError("a label must not be empty")
    # str.isprintable (C speed) implies _printable for every character; only a label it refuses (ZWJ,
    # no-break spaces, private use) needs the per-character test
    if len(label) > MAX_LABEL or not (label.isprintable() or all(_printable(c) for c in label)):
        raise EdgemetaError(f"label {label[:40]!r} is not allowed: at most {MAX_LABEL} printable characters")
    return label


# Bidirectional embeddings, overrides and isolates: they make a label print as another one.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _printable(c: str) -> bool:
    """Not a control (C0, DEL, C1), a lone surrogate (not text: it cannot be written as UTF-8), a
    line or paragraph separator, or a bidi control. Other format characters (ZWJ in emoji) are allowed."""
    return unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp") and c not in _BIDI
