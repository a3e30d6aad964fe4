"""The live view behind ``reqpmctl top``: one snapshot of the farm, shared by every viewer.

Why a shared snapshot and a long poll: a ``top`` window redraws every second, and a
hundred of them each asking for ``status`` would be a hundred loops of Redis reads. So
the main loop builds one snapshot at most once a second (and only while someone
watches), numbers it with a version that moves only when what it shows changed, and a
viewer asks "anything newer than version N?": the answer waits on a condition until
there is, or until a few seconds have passed. However many watch, the farm is read once
a second.

The snapshot holds instants (when a slot was taken, when its lease ends, when a host was
last heard of), not ages: ages change every second whether anything happened or not,
and the viewer, on this host and its clock, computes them as it draws.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from reqpmd.builds.gates import load_per_cpu
from reqpmd.builds.states import FINAL
from reqpmd.builds.store import Store
from reqpmd.checks import int_in_range
from reqpmd.cluster import Cluster
from reqpmd.errors import InvalidArgument, NotFound, ReqpmError
from reqpmd.quoting import shown
from reqpmd.status import Status

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between two snapshots at most: one a second, however many watch
MAX_WAIT = 5.0  # seconds a watch waits for a change: far under any client's read timeout
# seconds the main loop keeps building snapshots after the last watch: nobody watching
# costs nothing, and a viewer's next long poll (every MAX_WAIT at most) keeps it going
WATCHED_FOR = 3 * MAX_WAIT
RECENT = 20  # finished builds listed
THROUGHPUT_WINDOW = 3600.0  # seconds: "finished in the last hour"
# slots and waiters listed at most: a reply stays far under protocol.MAX_LINE whatever
# Redis holds (the counts say how many there are in all)
MAX_ROWS = 200
# an older reqpmd tells its load only through its load gate's text
_LOAD_IN_GATE = re.compile(r"load per CPU ([0-9]+(?:\.[0-9]+)?)")

Snapshot = dict[str, Any]


class Live:
    """The latest snapshot and its version, under a condition viewers wait on.

    ``take`` builds a snapshot's content (no time of its own: Live stamps it); the
    version moves only when that content differs from the last one."""

    def __init__(
        self,
        take: Callable[[], Snapshot],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self._take = take
        self._wake = wake  # the main loop's: it refreshes once a second while watched
        self._clock = clock
        self._wall = wall
        self._changed = threading.Condition()
        self._building = threading.Lock()  # one snapshot at a time, whoever asks
        self._snapshot: Snapshot = {}
        self._content = ""
        self._version = 0
        self._built_at = -math.inf
        self._watched_at = -math.inf
        self._last_failure = ""

    @property
    def version(self) -> int:
        with self._changed:
            return self._version

    def watched(self) -> bool:
        """Someone watched within WATCHED_FOR (the main loop keeps its TICK then)."""
        return self._clock() - self._watched_at <= WATCHED_FOR

    def refresh(self) -> bool:
        """Build a snapshot if the last one is INTERVAL old and someone watched within
        WATCHED_FOR; True if its content changed (the version moved). Never raises: the
        main loop calls it, and a view must not stop the daemon's loop."""
        if self._clock() - self._watched_at > WATCHED_FOR:
            return False
        with self._building:
            if self._clock() - self._built_at < INTERVAL:
                return False
            self._built_at = self._clock()
            try:
                content = self._take()
                self._last_failure = ""
            except Exception as exc:  # shown to the viewers, logged once per distinct one
                if str(exc) != self._last_failure:
                    log.exception("the live view (reqpmctl top) could not be refreshed")
                    self._last_failure = str(exc)
                with self._changed:
                    content = {**self._snapshot, "error": f"{type(exc).__name__}: {exc}"}
                content.pop("taken_at", None)
            return self._publish(content)

    def _publish(self, content: Snapshot) -> bool:
        canonical = json.dumps(content, sort_keys=True, default=str)
        with self._changed:
            if canonical == self._content:
                return False
            self._content = canonical
            self._snapshot = {**content, "taken_at": self._wall()}
            self._version += 1
            self._changed.notify_all()
            return True

    def watch(self, version: int | None, wait: float = MAX_WAIT) -> dict[str, Any]:
        """{"version", "snapshot"}: at once if the version is not ``version`` (None:
        always), else when it moves, or after ``wait`` seconds (at most MAX_WAIT) with
        the same version. The first viewer after a quiet spell does not wait for the
        main loop: the snapshot is brought up to date here (still once a second)."""
        was_watched = self.watched()
        self._watched_at = self._clock()
        if not was_watched:
            self._wake()
        self.refresh()
        with self._changed:
            self._changed.wait_for(
                lambda: self._version != version, timeout=max(0.0, min(wait, MAX_WAIT))
            )
            return {"version": self._version, "snapshot": self._snapshot}

    def request(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``top.watch`` operation: {"version": N or null, "wait": seconds}."""
        version = args.get("version")
        if version is not None:
            version = int_in_range("version", version, 0)
        wait = args.get("wait", MAX_WAIT)
        if (
            not isinstance(wait, int | float)
            or isinstance(wait, bool)
            or not math.isfinite(wait)
            or not 0 <= wait <= MAX_WAIT
        ):
            raise InvalidArgument(
                f"wait must be a number of seconds from 0 to {MAX_WAIT:g}, not {shown(wait)}"
            )
        return self.watch(version, float(wait))


class Farm:
    """What ``reqpmctl top`` shows, read from the services: the status reply (slots,
    waiters, gates, Redis, publishing), every host's heartbeat, and this host's store
    (the projects and chroots of its builds, the last finished builds, throughput)."""

    def __init__(
        self,
        status: Status,
        cluster: Cluster,
        store: Store,
        wall: Callable[[], float] = time.time,
        load: Callable[[], float] = load_per_cpu,
    ) -> None:
        self._status = status
        self._cluster = cluster
        self._store = store
        self._wall = wall
        self._load = load

    def snapshot(self) -> Snapshot:
        st = self._status.status(rows=MAX_ROWS)
        here = str(st["host_id"])
        hosts, hosts_error = self._hosts(here)
        publish = st.get("publish") or {}
        return {
            "host_id": here,
            "daemon_version": st["version"],
            "summary": st["summary"],
            "limit": st["max_concurrent"],
            "active_count": st["active_count"],
            "queued": st["queued"],
            "building_here": st["building_here"],
            "waiting_here": st["waiting_here"],
            "redis": {k: st["redis"].get(k) for k in ("url", "ok", "detail")},
            # an open gate's detail (free space to the MB) changes with every write:
            # only a closed one's says something worth a redraw
            "gates": [
                {"name": g["name"], "open": g["open"], "detail": None if g["open"] else g["detail"]}
                for g in st["gates"]
            ],
            "publish": {k: publish.get(k) for k in ("published", "pending", "failed")},
            "slots_total": len(st["active_builds"]),
            "slots": [self._slot(h, here) for h in st["active_builds"][:MAX_ROWS]],
            "waiting_total": st["waiting_total"],
            "waiting": [self._waiter(w, here) for w in st["waiting"][:MAX_ROWS]],
            # each project's (or ~user's) holders, cap, weight and waiters, busiest first
            "projects": st["groups"][:MAX_ROWS],
            "hosts": hosts,
            "hosts_error": hosts_error,
            "recent": self._recent(),
            "throughput": self._throughput(),
            "error": None,
        }

    def _builds_here(self, row: dict[str, Any], here: str) -> dict[str, Any]:
        """Project, chroot and source of a slot's or waiter's build, when it is one of
        this host's (the labels name the build; other hosts' builds are in their store)."""
        build = row.get("build")
        if row.get("host") != here or not isinstance(build, int) or isinstance(build, bool):
            return {"project": None, "chroot": None, "source": None}
        try:
            b = self._store.get(build)
        except NotFound:  # a label in Redis that names no build of ours
            return {"project": None, "chroot": None, "source": None}
        return {"project": b.project, "chroot": b.chroot, "source": b.source}

    def _slot(self, h: dict[str, Any], here: str) -> dict[str, Any]:
        return {
            "name": h["name"],
            "group": h.get("group"),
            "host": h["host"],
            "build": h.get("build"),
            "acquired_at": h["acquired_at"],
            "lease_expires_at": h["lease_expires_at"],
            **self._builds_here(h, here),
        }

    def _waiter(self, w: dict[str, Any], here: str) -> dict[str, Any]:
        return {
            "position": w["position"],
            "name": w["name"],
            "group": w.get("group"),
            "host": w["host"],
            "build": w.get("build"),
            "priority": w["priority"],
            "enqueued_at": w["enqueued_at"],
            **self._builds_here(w, here),
        }

    def _hosts(self, here: str) -> tuple[list[dict[str, Any]], str | None]:
        try:
            raw = self._cluster.hosts()
        except ReqpmError as exc:  # Redis down: the rest of the view still shows
            return [], str(exc)
        hosts = []
        for h in raw[:MAX_ROWS]:
            gates = [g for g in h.get("gates") or [] if isinstance(g, dict)]
            hosts.append(
                {
                    "host_id": h["host_id"],
                    "last_seen": h["last_seen"],
                    "stale": h.get("stale", False),
                    "building": h.get("building"),
                    "waiting": h.get("waiting"),
                    "queued": h.get("queued"),
                    "limit": h.get("max_concurrent_builds"),
                    "host_max_builds": h.get("host_max_builds"),
                    "load": round(self._load(), 2) if h["host_id"] == here else _load_of(h),
                    "gates": [{"name": g["name"], "open": g["open"]} for g in gates],
                    "closed": [
                        f"{g['name']}: {g.get('detail', '')}" for g in gates if not g["open"]
                    ],
                }
            )
        return hosts, None

    def _recent(self) -> list[dict[str, Any]]:
        """The last builds that ended, latest end first (the finished_at index, read
        backwards, stops after RECENT of them)."""
        finals = tuple(sorted(str(s) for s in FINAL))
        marks = ", ".join("?" for _ in finals)
        rows = self._store.rows(
            "SELECT id, state, chroot, project, source, submitted_name, started_at, "
            f"finished_at FROM builds WHERE finished_at IS NOT NULL AND +state IN ({marks})"
            " ORDER BY finished_at DESC LIMIT ?",
            (*finals, RECENT),
        )
        return [
            {
                "id": r[0],
                "state": r[1],
                "chroot": r[2],
                "project": r[3],
                "source": r[4],
                "by": r[5],
                "finished_at": r[7],
                "duration": (r[7] - r[6]) if r[6] is not None else None,
            }
            for r in rows
        ]

    def _throughput(self) -> dict[str, Any]:
        """Builds of this host that ended in the last THROUGHPUT_WINDOW, per end state,
        and their mean duration. Added up here, not with GROUP BY state: that would
        walk the state index over every build ever; this reads the last hour's rows
        through the index on finished_at."""
        rows = self._store.rows(
            "SELECT state, finished_at - started_at FROM builds WHERE finished_at >= ?",
            (self._wall() - THROUGHPUT_WINDOW,),
        )
        by_state: dict[str, int] = {}
        for state, _ in rows:
            by_state[str(state)] = by_state.get(str(state), 0) + 1
        durations = [d for _, d in rows if d is not None]
        mean = sum(durations) / len(durations) if durations else None
        return {
            "window": THROUGHPUT_WINDOW,
            "finished": len(rows),
            "by_state": by_state,
            "mean_duration": round(mean, 1) if mean is not None else None,
        }


def _load_of(h: dict[str, Any]) -> float | None:
    """Another host's load per CPU: from its heartbeat, or (an older reqpmd) from its
    load gate's text, if it has one."""
    load = h.get("load")
    if isinstance(load, int | float) and not isinstance(load, bool) and 0 <= load < 1e6:
        return round(float(load), 2)
    for g in h.get("gates") or []:
        if isinstance(g, dict) and g.get("name") == "load":
            found = _LOAD_IN_GATE.search(str(g.get("detail", "")))
            if found:
                return float(found.group(1))
    return None
