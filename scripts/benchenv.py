"""Machine state the bench scripts share: the page cache they start runs
from, and settings that change their figures.

Free page reporting (virtio-balloon): a guest kernel with it on hands free
memory blocks back to the hypervisor, which unmaps them; the next use of
such a page costs a fault in the hypervisor, in the middle of whatever
copy touched it first. Every drop of the page cache frees memory, so with
reporting on, runs that start from a dropped cache (and copies that drop
what they copied) write into pages the hypervisor has to map again:
slower and more variable, and more so the more fresh pages a run fills.
See docs/BENCHMARKS.md, "Free page reporting".

Steal time: on a virtual machine the hypervisor may run other work on the
physical CPUs while this VM's virtual CPUs wait (`steal` in /proc/stat).
On this machine it has taken up to 45% of the CPUs' time in bursts of
seconds, during which every process of a benchmark stalls and the
measured rate falls by as much. [`StealMeter`] records the share of each
timed run, so disturbed runs are visible in the results.
"""

import contextlib
import os
import socket
import statistics
from pathlib import Path

REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
# Largest buddy order on x86-64 (4 MiB blocks); a reporting order above it
# reports nothing.
MAX_PAGE_ORDER = 10


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_page_cache():
    """Writes back and drops the page cache (needs root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def prime(source: Path, length: int = -1):
    """Drops the page cache, then reads the first `length` bytes of `source`
    (all of it by default) into it: a copy then starts with the volume it
    reads cached and the one it writes not."""
    drop_page_cache()
    left = os.path.getsize(source) if length < 0 else length
    with open(source, "rb", buffering=0) as f:
        while left > 0:
            chunk = f.read(min(8 << 20, left))
            if not chunk:
                break
            left -= len(chunk)


def free_page_reporting() -> str:
    """'on (...)', 'off (...)' or 'not present', for the results."""
    try:
        order = int(REPORTING_ORDER.read_text().strip())
    except (OSError, ValueError):
        return "not present"
    if order > MAX_PAGE_ORDER:
        return f"off (page_reporting_order {order})"
    return f"on (page_reporting_order {order}: free blocks of {4 << order >> 10} MiB and more go back to the hypervisor)"


def warn_about_reporting(prog: str) -> str:
    """Prints a warning when free page reporting is on; returns the state."""
    state = free_page_reporting()
    if state.startswith("on"):
        print(f"{prog}: note: free page reporting is {state}; pages freed by cache drops cost a "
              f"hypervisor fault when used again, so runs from a dropped cache are slower and vary more "
              f"(docs/BENCHMARKS.md, \"Free page reporting\")", flush=True)
    return state


# Fields of the first line of /proc/stat, after "cpu".
_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

# A timed run whose steal share is above this is flagged in the results.
STEAL_WARN = 0.05


def cpu_times() -> dict:
    """Jiffies of all CPUs together since boot, by /proc/stat field
    (user, nice, system, idle, iowait, irq, softirq, steal)."""
    values = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    times = {name: int(v) for name, v in zip(_STAT_FIELDS, values)}
    times["total"] = sum(int(v) for v in values[:len(_STAT_FIELDS)])
    return times


def steal_share(before: dict, after: dict) -> float:
    """Share of the CPUs' time between two `cpu_times()` that the
    hypervisor took (0.0 when no time passed)."""
    total = after["total"] - before["total"]
    return (after["steal"] - before["steal"]) / total if total > 0 else 0.0


class StealMeter:
    """The steal share of every timed run of a benchmark."""

    def __init__(self):
        self.shares = []

    @contextlib.contextmanager
    def run(self):
        """Measures the block it wraps; its share is `self.shares[-1]`
        afterwards."""
        before = cpu_times()
        try:
            yield
        finally:
            self.shares.append(steal_share(before, cpu_times()))

    def last_text(self) -> str:
        """The last run's share, e.g. "steal 3%", marked when high."""
        share = self.shares[-1]
        return f"steal {share:.0%}" + (" (disturbed)" if share > STEAL_WARN else "")

    def summary(self) -> str:
        """One line on all runs: median and highest share, and how many
        runs lost more than STEAL_WARN of the CPUs to the hypervisor."""
        if not self.shares:
            return "no timed runs"
        high = sum(1 for s in self.shares if s > STEAL_WARN)
        return (f"median {statistics.median(self.shares):.1%}, highest {max(self.shares):.1%} "
                f"of the CPUs' time over {len(self.shares)} timed runs; {high} above {STEAL_WARN:.0%}")

    def warn(self, prog: str):
        """Prints a warning when some run lost more than STEAL_WARN."""
        high = [s for s in self.shares if s > STEAL_WARN]
        if high:
            print(f"{prog}: note: the hypervisor took more than {STEAL_WARN:.0%} of the CPUs' time "
                  f"(steal) in {len(high)} of {len(self.shares)} timed runs; those runs measured "
                  f"the host as much as the code: compare runs without it", flush=True)
