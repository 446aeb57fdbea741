"""CPU time and resident memory of the stack's processes, read from /proc."""
import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    cpu_seconds: float
    rss_bytes: int


def sample(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:  # the process is gone
        return None
    return Sample((int(stat[11]) + int(stat[12])) / TICKS, rss_pages * PAGE)


def children(pid):
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree(pid):
    """The process and all its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children(current))
    return found


def snapshot(groups):
    """{group: {pid: Sample}} for {group: [root pid, ...]} (each root with its descendants)."""
    result = {}
    for group, roots in groups.items():
        result[group] = {}
        for root in roots:
            for pid in tree(root):
                measured = sample(pid)
                if measured is not None:
                    result[group][pid] = measured
    return result


def totals(snap):
    """{group: (cpu seconds, rss bytes)} summed over each group's processes."""
    return {group: (sum(s.cpu_seconds for s in procs.values()), sum(s.rss_bytes for s in procs.values()))
            for group, procs in snap.items()}
