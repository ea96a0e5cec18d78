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


def children(pid: int) -> set[int]:
    """``pid``'s child processes, from each of its threads' ``children`` file (cheap enough
    to poll every few ms, unlike a scan of /proc)."""
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
        except OSError:
            continue
    return out
