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
"""

import os
from pathlib import Path

REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
# Largest buddy order on x86-64 (4 MiB blocks); a reporting order above it
# reports nothing.
MAX_PAGE_ORDER = 10


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
