"""Test helper: a process's children, read from /proc (Linux)."""

from __future__ import annotations

import os


def child_states(pid: int) -> dict[int, str]:
    """``pid``'s child processes and their states (R, S, Z, ...)."""
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out[int(entry)] = fields[0]
    return out
