"""CPU per delivery of the `stepfleet worker` processes a benchmark starts, measured from outside.

Runs the given command (any checkout's benchmark, e.g. `bench/throughput.py`), finds the
`stepfleet worker` processes among its descendants (every --scan seconds) and samples each
one's CPU time every --interval seconds, with timestamps: utime + stime in /proc/<pid>/stat
(all its threads), plus those of the worker's own descendants (guest or compiler processes),
live or exited. Workers alive at the same time form a group (throughput.py starts 1 worker,
stops it, then starts 2).

The load window of a group is read from the database its workers use (STEPFLEET_DATABASE_URL
in their environment): every --db-interval seconds, how many instances exist and how many are
final. The window starts at the last sample before the instance count rises above the
group's starting count plus --warmup (the bench's warm-up workflows) and ends at the first
sample where the group's last workflow is final. The workers' CPU seconds at both ends are
interpolated between samples; CPU per delivery is their difference over the workflows
finished in the window times --deliveries-per-workflow (the create plus each step: 4 for the
three-step example, whether a step comes through the broker or is taken on locally). No
benchmark cooperation is needed, so the same method measures any version of the code.

Prints JSON, one entry per group: the window, the CPU seconds of each worker in it, CPU ms
per delivery and per workflow, the workflows/s in the window, and the load average at its
start and end. The command's own output passes through.

    python bench/worker_cpu.py [--warmup 50] -- python bench/throughput.py --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

TICKS = os.sysconf("SC_CLK_TCK")
FINAL = ("complete", "errored", "terminated")


@dataclass
class Worker:
    pid: int
    database: str
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(monotonic time, CPU seconds so far, its own and its descendants')."""
    gone: bool = False
    helpers: set[int] = field(default_factory=set)
    """Its live descendants (e.g. guest or compiler processes), from the last scan."""
    helpers_seen: set[int] = field(default_factory=set)

    def sample(self) -> None:
        """Its CPU and its live descendants': an exited one's moves to its parent's
        children's time when it is waited for, so the sum does not jump."""
        own = cpu_seconds(self.pid)
        if own is None:
            self.gone = True
            return
        for pid in list(self.helpers):
            used = cpu_seconds(pid)
            if used is None:
                self.helpers.discard(pid)
            else:
                own += used
        self.samples.append((time.monotonic(), own))

    def cpu_at(self, moment: float) -> float:
        """CPU seconds at a moment, linear between the two samples around it."""
        times = [t for t, _ in self.samples]
        i = bisect_left(times, moment)
        if i == 0:
            return self.samples[0][1]
        if i == len(self.samples):
            return self.samples[-1][1]
        (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (moment - t0) / (t1 - t0)


@dataclass
class Group:
    workers: list[Worker] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return any(not w.gone for w in self.workers)


def cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # utime, stime, and those of its children that exited and were waited for
    return sum(int(f) for f in fields[11:15]) / TICKS


def process_parents() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process now."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    return parents


def descendants(parents: dict[int, list[int]], root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def worker_database(pid: int) -> str | None:
    """The database URL of a `stepfleet worker` process, None for any other process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"stepfleet" not in argv or b"worker" not in argv:
        return None
    for item in environ:
        if item.startswith(b"STEPFLEET_DATABASE_URL="):
            return item.split(b"=", 1)[1].decode()
    return None


class DatabaseWatch(threading.Thread):
    """Polls one database's instance counts: (monotonic time, instances, final ones)."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, int]] = []
        self._url, self._interval = url, interval
        self.stop = threading.Event()

    def run(self) -> None:
        engine = create_engine(self._url, pool_size=1)
        query = text("SELECT count(*), count(*) FILTER (WHERE status = ANY(:final)) FROM instances")
        try:
            with engine.connect() as connection:
                while not self.stop.is_set():
                    row = connection.execute(query, {"final": list(FINAL)}).one()
                    connection.commit()
                    self.samples.append((time.monotonic(), int(row[0]), int(row[1])))
                    self.stop.wait(self._interval)
        except Exception:  # the bench drops its database at the end
            return
        finally:
            engine.dispose()


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def nearest(loads: list[tuple[float, list[float]]], moment: float) -> list[float]:
    return min(loads, key=lambda sample: abs(sample[0] - moment))[1]


def window(
    group: Group, watch: DatabaseWatch, warmup: int
) -> tuple[tuple[float, int], tuple[float, int]] | None:
    """(time, final instances) at the start and at the end of the group's load."""
    first = min(w.samples[0][0] for w in group.workers if w.samples)
    last = max(w.samples[-1][0] for w in group.workers if w.samples)
    rows = [s for s in watch.samples if first <= s[0] <= last]
    if not rows:
        return None
    warm = rows[0][1] + warmup
    rising = next((i for i, s in enumerate(rows) if s[1] > warm), None)
    if rising is None or rising == 0:
        return None
    start = rows[rising - 1]
    done = max(s[2] for s in rows)
    end = next(s for s in rows if s[2] == done)
    return (start[0], start[2]), (end[0], end[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.025, help="CPU sampling, seconds")
    parser.add_argument("--scan", type=float, default=0.25, help="new-process scan, seconds")
    parser.add_argument("--db-interval", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=50, help="warm-up workflows per group")
    parser.add_argument("--deliveries-per-workflow", type=int, default=4)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    loads: list[tuple[float, list[float]]] = []
    groups: list[Group] = []
    seen: set[int] = set()
    watches: dict[str, DatabaseWatch] = {}
    began = time.monotonic()
    child = subprocess.Popen(command)
    next_scan = 0.0
    while child.poll() is None:
        now = time.monotonic()
        if now >= next_scan:
            next_scan = now + args.scan
            loads.append((now, load_average()))
            parents = process_parents()
            for group in groups:
                for worker in group.workers:
                    if not worker.gone:
                        # a worker stopped since the last sample must not join the new group
                        worker.sample()
                    if not worker.gone:
                        worker.helpers = set(descendants(parents, worker.pid))
                        worker.helpers_seen |= worker.helpers
            for pid in descendants(parents, child.pid):
                if pid in seen:
                    continue
                seen.add(pid)
                database = worker_database(pid)
                if database is None:
                    continue
                if not groups or not groups[-1].alive:
                    groups.append(Group())
                groups[-1].workers.append(Worker(pid, database))
                if database not in watches:
                    watches[database] = DatabaseWatch(database, args.db_interval)
                    watches[database].start()
        for group in groups:
            for worker in group.workers:
                if not worker.gone:
                    worker.sample()
        time.sleep(args.interval)
    for watch in watches.values():
        watch.stop.set()

    report: list[dict[str, object]] = []
    for group in groups:
        watch = watches[group.workers[0].database]
        bounds = window(group, watch, args.warmup)
        entry: dict[str, object] = {
            "workers": len(group.workers),
            "cpu_seconds_lifetime": [round(w.samples[-1][1], 2) for w in group.workers],
            "descendant_processes": [len(w.helpers_seen) for w in group.workers],
        }
        if bounds is None:
            entry["error"] = "no load window found in the database samples"
            report.append(entry)
            continue
        (start, final_start), (end, final_end) = bounds
        workflows = final_end - final_start
        spent = [w.cpu_at(end) - w.cpu_at(start) for w in group.workers]
        deliveries = workflows * args.deliveries_per_workflow
        near = [nearest(loads, moment) for moment in (start, end)]
        entry |= {
            "window_s": [round(start - began, 2), round(end - began, 2)],
            "workflows": workflows,
            "deliveries": deliveries,
            "workflows_per_s": round(workflows / (end - start), 1),
            "cpu_seconds": [round(u, 3) for u in spent],
            "cpu_ms_per_workflow": round(1000 * sum(spent) / workflows, 3),
            "cpu_ms_per_delivery": round(1000 * sum(spent) / deliveries, 3),
            "loadavg_start": near[0],
            "loadavg_end": near[1],
        }
        report.append(entry)
    print(json.dumps({"command": command, "groups": report}, indent=2))
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
