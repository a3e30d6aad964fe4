"""``reqpmctl top``: a live, full-screen view of the farm, like top(1).

Why it is built this way:

- One connection for the whole session, long-polling ``top.watch``: the daemon builds
  one snapshot a second for every viewer together, and a user may hold only 8
  connections at once. A request follows each reply at once, so the daemon's deadline
  for sending a request (10 s) is never near, even while the view is paused.
- A poller thread waits on the daemon; the main thread owns the terminal. It redraws
  when a reply comes, at each second (ages move), on a key and on SIGWINCH, and it alone
  changes the terminal's modes, so it restores them on every way out: q, Ctrl-C,
  SIGTERM, an error.
- rich draws, not hand-written escape codes. Every text from the daemon (names and hosts
  may come from a shared Redis) goes through ``output.safe`` into a ``rich.text.Text``,
  never through rich's markup.
- Not on a terminal, or with ``--once``: one plain snapshot (``output.table``, no escape
  codes), for scripts, ``less`` and a pasted ticket.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from reqpmctl import output
from reqpmctl.client import Client, ClientError
from reqpmctl.context import Ctx, pass_ctx

WAIT = 5.0  # seconds the daemon may hold a long poll (it caps it at reqpmd.live.MAX_WAIT)
RETRY = 1.0  # seconds between attempts while the daemon cannot be reached
MIN_REDRAW = 0.05  # seconds: never spin when the next whole second is very near
MIN_COLUMN = 3  # characters a shrunk column keeps (an ellipsis and two more)

Row = dict[str, Any]


# -- sorting ---------------------------------------------------------------------------


def _text_key(value: Any) -> tuple[int, float, str]:
    """Numbers before text, missing values last, never a TypeError between them."""
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


@dataclass(frozen=True)
class SortKey:
    name: str
    key: Callable[[Row], Any]
    descending: bool = False  # the natural direction of this column


def _at(field_name: str) -> Callable[[Row], Any]:
    return lambda r: _text_key(r.get(field_name))


def _since(field_name: str) -> Callable[[Row], Any]:
    """An age's order (now minus an instant): the later the instant, the younger."""

    def key(r: Row) -> Any:
        value = r.get(field_name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _text_key(-value)
        return _text_key(value)

    return key


# The arrows in a table's title speak of the values shown: "age ↓" is the oldest first.
SORTS: dict[str, list[SortKey]] = {
    "slots": [
        SortKey("age", _since("acquired_at"), descending=True),
        SortKey("lease left", _at("lease_expires_at")),
        SortKey("build", _at("build")),
        SortKey("host", _at("host")),
        SortKey("project", _at("project")),
        SortKey("chroot", _at("chroot")),
    ],
    "waiting": [
        SortKey("queue", _at("position")),
        SortKey("priority", _at("priority"), descending=True),
        SortKey("waited", _since("enqueued_at"), descending=True),
        SortKey("host", _at("host")),
    ],
    "projects": [
        SortKey("holding", _at("holders"), descending=True),
        SortKey("waiting", _at("waiting"), descending=True),
        SortKey("project", _at("group")),
    ],
    "hosts": [
        SortKey("host", _at("host_id")),
        SortKey("heartbeat", _since("last_seen")),
        SortKey("building", _at("building"), descending=True),
        SortKey("load", _at("load"), descending=True),
    ],
    "recent": [
        SortKey("ended", _since("finished_at")),
        SortKey("took", _at("duration"), descending=True),
        SortKey("state", _at("state")),
        SortKey("build", _at("id"), descending=True),
    ],
}
# a lower-case key picks the table's next sort column, its capital reverses the order
SORT_KEYS = {"s": "slots", "w": "waiting", "j": "projects", "h": "hosts", "f": "recent"}


@dataclass
class View:
    """What the keys change: each table's sort column and direction, and the pause."""

    sort: dict[str, tuple[int, bool]] = field(
        default_factory=lambda: {t: (0, SORTS[t][0].descending) for t in SORTS}
    )
    paused: bool = False

    def next_sort(self, table: str) -> None:
        index = (self.sort[table][0] + 1) % len(SORTS[table])
        self.sort[table] = (index, SORTS[table][index].descending)

    def reverse(self, table: str) -> None:
        index, descending = self.sort[table]
        self.sort[table] = (index, not descending)

    def label(self, table: str) -> str:
        index, descending = self.sort[table]
        return f"by {SORTS[table][index].name} {'↓' if descending else '↑'}"

    def sorted(self, table: str, rows: Sequence[Row]) -> list[Row]:
        index, descending = self.sort[table]
        return sorted(rows, key=SORTS[table][index].key, reverse=descending)

    def key(self, char: str) -> bool:
        """Apply one key; False for q (quit)."""
        if char == "q":
            return False
        if char == "p":
            self.paused = not self.paused
        elif char in SORT_KEYS:
            self.next_sort(SORT_KEYS[char])
        elif char.lower() in SORT_KEYS:
            self.reverse(SORT_KEYS[char.lower()])
        return True


# -- what each table shows ----------------------------------------------------------------


def _ago(stamp: Any, now: float) -> str:
    return output.duration(now - stamp) if isinstance(stamp, int | float) else "-"


def _left(stamp: Any, now: float) -> str:
    return output.duration(stamp - now) if isinstance(stamp, int | float) else "-"


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else output.safe(value)


def _gates(h: Row) -> str:
    shut = [
        g.get("name") for g in h.get("gates") or [] if isinstance(g, dict) and not g.get("open")
    ]
    return "open" if not shut else "CLOSED: " + ",".join(_cell(n) for n in shut)


def _load(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "-"


# Each table: (header, value of a row, flexible: may be cut short to fit the width).
Column = tuple[str, Callable[[Row, float], str], bool]


def slot_columns(wide: bool) -> list[Column]:
    columns: list[Column] = [
        ("SLOT", lambda r, now: _cell(r.get("name")), True),
        ("HOST", lambda r, now: _cell(r.get("host")), True),
        ("BUILD", lambda r, now: _cell(r.get("build")), False),
        ("PROJECT", lambda r, now: _group(r), True),
        ("CHROOT", lambda r, now: _cell(r.get("chroot")), True),
        ("AGE", lambda r, now: _ago(r.get("acquired_at"), now), False),
        ("LEASE LEFT", lambda r, now: _left(r.get("lease_expires_at"), now), False),
    ]
    if wide:
        columns.insert(5, ("SOURCE", lambda r, now: _cell(r.get("source")), True))
    return columns


def waiting_columns(wide: bool) -> list[Column]:
    columns: list[Column] = [
        ("#", lambda r, now: _cell(r.get("position")), False),
        ("WAITING", lambda r, now: _cell(r.get("name")), True),
        ("HOST", lambda r, now: _cell(r.get("host")), True),
        ("PRIO", lambda r, now: _cell(r.get("priority")), False),
        ("WAITED", lambda r, now: _ago(r.get("enqueued_at"), now), False),
        ("PROJECT", lambda r, now: _group(r), True),
        ("CHROOT", lambda r, now: _cell(r.get("chroot")), True),
    ]
    if wide:
        columns.insert(3, ("BUILD", lambda r, now: _cell(r.get("build")), False))
    return columns


def _group(r: Row) -> str:
    """A build's project, or for a build of another host or without one, the group whose
    share it uses (its project, or ~user)."""
    return _cell(r.get("project") or r.get("group"))


def project_columns(wide: bool) -> list[Column]:
    return [
        ("PROJECT", lambda r, now: _cell(r.get("group")), True),
        ("HOLDING", lambda r, now: _cell(r.get("holders")), False),
        ("CAP", lambda r, now: _cell(r.get("max_concurrent") or "-"), False),
        ("WEIGHT", lambda r, now: _cell(r.get("weight")), False),
        ("WAITING", lambda r, now: _cell(r.get("waiting")), False),
    ]


def host_columns(wide: bool) -> list[Column]:
    columns: list[Column] = [
        ("HOST", lambda r, now: _cell(r.get("host_id")), True),
        (
            "HEARTBEAT",
            lambda r, now: _ago(r.get("last_seen"), now) + (" STALE" if r.get("stale") else ""),
            False,
        ),
        ("BUILDING", lambda r, now: _cell(r.get("building")), False),
        ("WAITING", lambda r, now: _cell(r.get("waiting")), False),
        ("QUEUED", lambda r, now: _cell(r.get("queued")), False),
        ("LOAD", lambda r, now: _load(r.get("load")), False),
        ("LIMIT", lambda r, now: _cell(r.get("limit")), False),
        ("GATES", lambda r, now: _gates(r), True),
    ]
    if wide:
        columns.insert(
            7, ("HOST CAP", lambda r, now: _cell(r.get("host_max_builds") or None), False)
        )
    return columns


def recent_columns(wide: bool) -> list[Column]:
    columns: list[Column] = [
        ("BUILD", lambda r, now: _cell(r.get("id")), False),
        ("STATE", lambda r, now: _cell(r.get("state")), False),
        ("PROJECT", lambda r, now: _cell(r.get("project")), True),
        ("SOURCE", lambda r, now: _cell(r.get("source")), True),
        ("CHROOT", lambda r, now: _cell(r.get("chroot")), True),
        ("TOOK", lambda r, now: output.duration(r.get("duration")), False),
        ("ENDED", lambda r, now: _ago(r.get("finished_at"), now) + " ago", False),
    ]
    if wide:
        columns.insert(5, ("BY", lambda r, now: _cell(r.get("by")), True))
    return columns


COLUMNS: dict[str, Callable[[bool], list[Column]]] = {
    "slots": slot_columns,
    "waiting": waiting_columns,
    "projects": project_columns,
    "hosts": host_columns,
    "recent": recent_columns,
}
TABLES = ("slots", "waiting", "projects", "hosts", "recent")  # top to bottom
WIDE = 110  # columns from which the tables show more columns


def _rows(snap: Row, table: str) -> list[Row]:
    rows = snap.get(table)
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _n(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "?"


def titles(snap: Row) -> dict[str, str]:
    hosts = _rows(snap, "hosts")
    stale = sum(1 for h in hosts if h.get("stale"))
    return {
        "slots": f"SLOTS  {_n(snap.get('active_count'))}/{_n(snap.get('limit'))} busy cluster-wide",
        "waiting": f"WAITING FOR A SLOT  {_n(snap.get('waiting_total'))} (#: place in its "
        "project's queue)",
        "projects": "PROJECTS  slots shared by weight, up to each cap",
        "hosts": f"HOSTS  {len(hosts)}" + (f", {stale} stale" if stale else ""),
        "recent": "LAST FINISHED HERE",
    }


def header(snap: Row, now: float) -> str:
    redis = snap.get("redis") or {}
    return (
        f"{_cell(snap.get('host_id'))} {time.strftime('%H:%M:%S', time.localtime(now))}"
        f" | slots {_n(snap.get('active_count'))}/{_n(snap.get('limit'))}"
        f" | here: {_n(snap.get('building_here'))} building, {_n(snap.get('waiting_here'))} "
        f"waiting, {_n(snap.get('queued'))} queued"
        f" | redis {'ok' if redis.get('ok') else 'DOWN'}"
    )


def throughput(snap: Row) -> str:
    t = snap.get("throughput") or {}
    by_state = t.get("by_state") or {}
    line = f"last hour here: {_n(t.get('finished'))} builds finished"
    if by_state:
        parts = ", ".join(f"{_n(n)} {_cell(s)}" for s, n in sorted(by_state.items()))
        line += f" ({parts}), mean {output.duration(t.get('mean_duration'))}"
    pub = snap.get("publish") or {}
    if pub.get("pending") or pub.get("failed"):
        line += f" | publish: {_n(pub.get('pending'))} pending, {_n(pub.get('failed'))} failed"
    return line


def problems(snap: Row, trouble: str | None) -> list[str]:
    """What is wrong, worst first: the connection, the view itself, Redis, gates, the
    rest of the status summary (a restart grace, a failing repository, ...)."""
    found = []
    if trouble:
        found.append(trouble)
    if snap.get("error"):
        found.append(f"the daemon could not refresh this view: {_cell(snap['error'])}")
    redis = snap.get("redis") or {}
    if redis and not redis.get("ok"):
        found.append(f"Redis DOWN: {_cell(redis.get('detail'))}")
    for g in snap.get("gates") or []:
        if isinstance(g, dict) and not g.get("open"):
            found.append(f"gate {_cell(g.get('name'))} closed: {_cell(g.get('detail'))}")
    for h in _rows(snap, "hosts"):
        if h.get("host_id") != snap.get("host_id"):  # this host's gates are above
            found += [f"{_cell(h.get('host_id'))}: gate {_cell(c)}" for c in h.get("closed") or []]
    if snap.get("hosts_error"):
        found.append(f"hosts: {_cell(snap['hosts_error'])}")
    # the rest of the status summary: what is said above (the counts, Redis, gates) left out
    said = ("building here, ", "waiting for Redis", "gate closed: ")
    extra = str(snap.get("summary") or "").split("; ")
    found += [_cell(p) for p in extra if p and not any(x in p for x in said)]
    return found


# -- plain text (--once, or not a terminal) --------------------------------------------------


def plain(snap: Row, now: float) -> str:
    """One snapshot as plain text: every table whole, no escape codes."""
    view = View()
    lines = [header(snap, now), throughput(snap)]
    lines += [f"! {p}" for p in problems(snap, None)]
    names = titles(snap)
    for table in TABLES:
        rows = view.sorted(table, _rows(snap, table))
        lines += ["", names[table] + ("" if rows else ": none")]
        if rows:
            columns = COLUMNS[table](True)
            lines.append(
                output.table(
                    [c[0] for c in columns], [[c[1](r, now) for c in columns] for r in rows]
                )
            )
    return "\n".join(lines)


# -- the screen ---------------------------------------------------------------------------------


def fit(natural: list[int], flexible: list[bool], width: int, gap: int = 1) -> list[int]:
    """Column widths that fit ``width``: the widest flexible column gives up a character
    at a time (none below MIN_COLUMN); numbers and times are never cut."""
    widths = list(natural)
    while sum(widths) + gap * (len(widths) - 1) > width:
        candidates = [i for i, f in enumerate(flexible) if f and widths[i] > MIN_COLUMN]
        if not candidates:
            break  # cannot fit: the screen crops the right edge
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "cancelled": "magenta",
}


def _table(
    columns: list[Column], rows: list[Row], total: int, now: float, width: int, budget: int
) -> RenderableType:
    """A table of at most ``budget`` body lines; when not all of the ``total`` rows fit,
    its last line says how many more there are."""
    fits = len(rows) <= budget and total <= len(rows)
    shown_rows = rows if fits else rows[: max(0, budget - 1)]
    cells = [[c[1](r, now) for c in columns] for r in shown_rows]
    natural = [max([len(c[0])] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    widths = fit(natural, [c[2] for c in columns], width)
    table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False, expand=False)
    for (name, _, _), w in zip(columns, widths, strict=True):
        table.add_column(
            Text(name), width=w, no_wrap=True, overflow="ellipsis", header_style="bold"
        )
    for row in cells:
        table.add_row(*[Text(cell, style=STATE_STYLE.get(cell, "")) for cell in row])
    if len(shown_rows) == max(total, len(rows)):
        return table
    more = Text(f"... {max(total, len(rows)) - len(shown_rows)} more", style="dim")
    return Group(table, more)


def _budgets(wants: list[int], room: int) -> list[int]:
    """Body lines per table: one at a time to each table that wants more, in turn, so a
    long queue does not push the hosts off the screen."""
    got = [0] * len(wants)
    while room > 0:
        given = False
        for i, want in enumerate(wants):
            if room > 0 and got[i] < want:
                got[i] += 1
                room -= 1
                given = True
        if not given:
            break
    return got


def screen(
    snap: Row, now: float, view: View, width: int, height: int, trouble: str | None
) -> RenderableType:
    """The whole screen for a terminal of ``width`` x ``height``."""
    wide = width >= WIDE
    bar = "reverse"
    top = ("PAUSED (p resumes) | " if view.paused else "") + header(snap, now)
    parts: list[RenderableType] = [
        Text(top.ljust(width), style=bar, no_wrap=True, overflow="ellipsis"),
        Text(throughput(snap), no_wrap=True, overflow="ellipsis"),
    ]
    trouble_lines = problems(snap, trouble)
    footer = Text(
        "q quit  p pause  s/w/j/h/f sort slots/waiting/projects/hosts/finished (capital: "
        "reverse)".ljust(width),
        style=bar,
        no_wrap=True,
        overflow="ellipsis",
    )
    tables = list(TABLES)
    rows = {t: view.sorted(t, _rows(snap, t)) for t in tables}
    # fixed lines: header, throughput, footer; a title per table, a header row per
    # table with rows; at most two problem lines while the rest fits
    fixed = 3 + len(tables) + sum(1 for t in tables if rows[t])
    shown_trouble = trouble_lines[: max(0, min(2, height - fixed - 1))]
    parts += [Text(p, style="bold red", no_wrap=True, overflow="ellipsis") for p in shown_trouble]
    room = max(0, height - fixed - len(shown_trouble))
    budgets = _budgets([len(rows[t]) for t in tables], room)
    names = titles(snap)
    folded = 0
    for table, budget in zip(tables, budgets, strict=True):
        title = Text(no_wrap=True, overflow="ellipsis")
        title.append(names[table], style="bold cyan")
        if rows[table] and budget == 0:  # not one row fits: the title says so, no header
            title.append(f": {len(rows[table])} row(s), no room to show", style="dim")
            parts.append(title)
            folded += 1
        elif rows[table]:
            title.append(f"  {view.label(table)}", style="dim")
            parts.append(title)
            columns = COLUMNS[table](wide)
            total = snap.get(f"{table}_total")
            count = total if isinstance(total, int) else len(rows[table])
            parts.append(_table(columns, rows[table], count, now, width, budget))
        else:
            title.append(": none", style="dim")
            parts.append(title)
    # the footer sits on the last line whatever the tables took
    used = fixed - folded + len(shown_trouble) + sum(budgets)
    parts += [Text("")] * max(0, height - used)
    parts.append(footer)
    return Group(*parts)


class Poller:
    """Long-polls ``top.watch`` on one connection in a thread of its own; keeps the
    latest snapshot and what went wrong, and pokes the screen after each reply."""

    def __init__(self, client: Client, first: Row, poke: Callable[[], None]) -> None:
        self.client = client
        self.poke = poke
        self.lock = threading.Lock()
        self.snapshot: Row = first["snapshot"]
        self.version: int | None = first["version"]
        self.trouble: str | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="top-poll", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def latest(self) -> tuple[Row, str | None]:
        with self.lock:
            return self.snapshot, self.trouble

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                reply = self.client.call("top.watch", {"version": self.version, "wait": WAIT})
                snapshot, version = reply["snapshot"], int(reply["version"])
            except (ClientError, KeyError, TypeError, ValueError) as exc:
                message = exc.message if isinstance(exc, ClientError) else f"bad reply: {exc}"
                with self.lock:
                    self.trouble = f"{message} (trying again)"
                self.client.close()  # the next call connects afresh
                self.version = None  # and is answered at once: a new daemon counts anew
                self.poke()
                self.stopping.wait(RETRY)
                continue
            with self.lock:
                self.snapshot, self.version, self.trouble = snapshot, version, None
            self.poke()


class Terminal:
    """The terminal in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still
    interrupts), restored however the view ends."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None

    @contextlib.contextmanager
    def cbreak(self) -> Iterator[None]:
        self.saved = termios.tcgetattr(self.fd)
        try:
            tty.setcbreak(self.fd, termios.TCSANOW)
            yield
        finally:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP end the view through the same finally blocks as q."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals(wake: Callable[[], None]) -> Iterator[None]:
    handlers = {
        signal.SIGWINCH: lambda signum, frame: wake(),
        signal.SIGTERM: _terminate,
        signal.SIGHUP: _terminate,
    }
    saved = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def run_screen(client: Client, first: Row) -> None:
    """The full-screen view until q (or Ctrl-C, SIGTERM, SIGHUP)."""
    keys = sys.stdin.isatty()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # the poller may still be in a long poll when the view ends: it must not write to
    # the pipe once closed (its number may be another file's by then)
    pipe = threading.Lock()
    pipe_open = [True]

    def wake() -> None:
        with pipe, contextlib.suppress(BlockingIOError):  # a full pipe wakes it already
            if pipe_open[0]:
                os.write(wake_w, b"x")

    poller = Poller(client, first, wake)
    view = View()
    frozen: tuple[Row, float, str | None] | None = None
    console = Console(highlight=False)
    terminal = Terminal(sys.stdin.fileno())
    modes = terminal.cbreak() if keys else contextlib.nullcontext()
    try:
        with (
            _signals(wake),
            modes,
            Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            poller.start()
            while True:
                # read the size at each redraw: after SIGWINCH it is the new one
                size = os.get_terminal_size(sys.stdout.fileno())
                console.size = (size.columns, size.lines)
                if view.paused:  # the screen as it was when p was pressed, ages too
                    if frozen is None:
                        held, held_trouble = poller.latest()
                        frozen = (held, time.time(), held_trouble)
                    snap, now, trouble = frozen
                else:
                    frozen = None
                    snap, trouble = poller.latest()
                    now = time.time()
                live.update(
                    screen(snap, now, view, size.columns, size.lines, trouble), refresh=True
                )
                timeout = max(MIN_REDRAW, 1.0 - time.time() % 1.0)
                ready, _, _ = select.select(
                    [wake_r, sys.stdin.fileno()] if keys else [wake_r], [], [], timeout
                )
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                if keys and sys.stdin.fileno() in ready:
                    chunk = os.read(sys.stdin.fileno(), 64)
                    if not chunk:
                        return  # the terminal went away
                    if chunk.startswith(b"\x1b"):
                        continue  # an arrow or function key: not ours
                    for char in chunk.decode(errors="replace"):
                        if not view.key(char):
                            return
    except KeyboardInterrupt:
        return  # Ctrl-C quits like q; the terminal is already restored
    finally:
        poller.stop()
        with pipe:
            pipe_open[0] = False
            os.close(wake_r)
            os.close(wake_w)


@click.command()
@click.option(
    "--once", is_flag=True, help="Print one plain snapshot and exit (as when not on a terminal)."
)
@pass_ctx
def top(c: Ctx, once: bool) -> None:
    """A live view of the farm, like top(1): slots, waiters, projects, hosts, finished
    builds.

    \b
    Keys:
      q        quit (so does Ctrl-C)
      p        pause / resume
      s w j h f  sort slots / waiting / projects / hosts / finished by their next column
      S W J H F  reverse that table's order
    Not on a terminal, or with --once, it prints one plain snapshot (--json: the
    snapshot as JSON) and exits."""
    client = c.client()  # one connection for the whole session
    try:
        first = client.call("top.watch", {"version": None})
        if once or c.json or not sys.stdout.isatty():
            c.emit(first["snapshot"], plain(first["snapshot"], time.time()))
            return
        try:
            run_screen(client, first)
        except Exception as exc:
            # the terminal is restored by now: one line, no traceback
            raise ClientError("failed", f"top: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()
