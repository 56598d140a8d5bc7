"""What the DingTalk benchmarks share: a bot in its own process connected to the emulator, its CPU
time, and percentiles. (``stream_ack.py`` and ``e2e_reply.py`` import it; the benchmarks directory
is on ``sys.path`` when a script in it runs.)"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@asynccontextmanager
async def running_bot(emu: Any, command: list[str], env: dict[str, str]) -> AsyncIterator[trio.Process]:
    """Run ``command`` (a bot) until the block ends; entered once its Stream connection is open."""
    before = len(emu.connections(with_frames=False))
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, command, env=env, check=False,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        try:
            with trio.fail_after(30):
                await emu.wait_for_connection(before + 1)
            yield process
        finally:
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
