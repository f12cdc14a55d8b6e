"""kvprof's own code inside a recorded process, as the analyses recognise it in stacks.

One definition, read by the heap probe (allocations of kvprof's own left out of the
user's figures), kvprof.analysis.heap and kvprof.analysis.cpu (kvprof's overhead,
kvprof's idle threads).  No kvprof imports (tests/test_boundaries.py); every entry
names code that exists (tests/test_owncode.py), so renaming or moving that code
fails a test instead of silently miscounting.
"""

from __future__ import annotations

# kvprof's own recording code inside a target, as path fragments: what the CPU
# section counts as kvprof's overhead and the heap probes leave out of the user's
# figures.  kvprof.blocks pools and the demo are the user's work, not listed.
OWN_CODE = (
    "/kvprof/probes/",
    "/kvprof/trace/",
    "/kvprof/_hook/",
    "/kvprof/runtime.py",
    "/kvprof/signals.py",
    "/kvprof/owncode.py",
    "/kvprof/__init__.py",
)

# kvprof's helper threads asleep between work: (qualified name, file suffix) of each
# thread's loop, as py-spy names the frame
IDLE_LOOPS = (
    ("ProcessWriter._run", "kvprof/trace/writer.py"),  # the writer thread
    ("_timer", "kvprof/probes/heap.py"),  # tracemalloc's snapshot timer
)


def is_own_code(path: str) -> bool:
    return any(part in path for part in OWN_CODE)
