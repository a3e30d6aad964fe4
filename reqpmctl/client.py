"""Talking to reqpmd over its Unix socket (no click here: scripts can use this too)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reqpmd.builds.results import is_plain_name
from reqpmd.control import protocol
from reqpmd.quoting import printable, shown

DEFAULT_SOCKET = "/run/reqpm/reqpmd.sock"
SUBMIT_TIMEOUT = 900.0
CLEANUP_TIMEOUT = 3600.0  # a cleanup scrubs orphaned mock roots: minutes each
SYNC_TIMEOUT = 960.0  # a little over the daemon's own wait (control.repositories.SYNC_WAIT)
# The daemon hashes a page of result files before it answers: big packages, slow disk.
FETCH_TIMEOUT = 600.0
# projects.* calls answered after git ran: a waited-for sync (the daemon waits up to
# control.projects.SYNC_WAIT), a build now (a fetch of its own, perhaps after another
# one holding the clone's lock), an edit or removal waiting for a fetch to end
PROJECT_TIMEOUT = 960.0
COPY_CHUNK = 1024 * 1024
STAGING_PREFIX = ".reqpmctl-fetch-"  # fetched files wait here, inside the destination


def default_socket() -> str:
    return os.environ.get("REQPM_SOCKET") or DEFAULT_SOCKET


class ClientError(Exception):
    """The daemon said no (code from its error vocabulary), or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def exit_code(self) -> int:
        return protocol.ERROR_EXIT.get(self.code, protocol.EXIT_FAILED)


class ResultExists(ClientError):
    """A fetched file would replace one already in the destination (and force is off)."""

    def __init__(self, path: Path, detail: str = "") -> None:
        super().__init__("conflict", f"{printable(str(path))} already exists{detail}")
        self.path = path


class Client:
    def __init__(self, path: str | Path | None = None, timeout: float = 30.0) -> None:
        self.path = str(path or default_socket())
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: protocol.LineReader | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except FileNotFoundError:
                sock.close()
                raise ClientError(
                    "unreachable",
                    f"no socket at {self.path}: is reqpmd "
                    "running? (systemctl status reqpmd; --socket PATH or "
                    "$REQPM_SOCKET to use another)",
                ) from None
            except PermissionError:
                sock.close()
                raise ClientError(
                    "unreachable",
                    f"permission denied on {self.path}: are you "
                    "in the socket's group (reqpm)? (id -Gn)",
                ) from None
            except (ConnectionRefusedError, OSError) as exc:
                sock.close()
                raise ClientError(
                    "unreachable",
                    f"cannot connect to {self.path}: "
                    f"{exc.strerror or exc}; is reqpmd running? "
                    "(systemctl status reqpmd)",
                ) from None
            self._sock = sock
            self._reader = protocol.LineReader(sock)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, op: str, args: dict[str, Any] | None = None, fds: list[int] | None = None
    ) -> Any:
        """The result of ``op``; descriptors the reply carried are closed unread."""
        result, got = self.call_with_fds(op, args, fds)
        protocol.close_all(got)
        return result

    def call_with_fds(
        self, op: str, args: dict[str, Any] | None = None, fds: list[int] | None = None
    ) -> tuple[Any, list[int]]:
        """The result of ``op`` and the descriptors its reply carried, which the caller
        now owns and must close. An error reply's descriptors are closed here."""
        sock = self._connect()
        assert self._reader is not None
        request = protocol.encode({"v": protocol.VERSION, "op": op, "args": args or {}})
        try:
            protocol.send_with_fds(sock, request, fds or [])
        except ConnectionError as exc:
            # It hung up before we sent: a refusal (too many connections) says why first.
            said = self._last_words()
            self.close()
            raise said or self._lost(exc) from None
        except OSError as exc:
            self.close()
            raise self._lost(exc) from None
        try:
            frame = self._reader.read()
        except (OSError, protocol.FrameError) as exc:
            self.close()
            raise self._lost(exc) from None
        if frame is None:
            self.close()
            raise self._lost(EOFError())
        line, got = frame
        try:
            reply = protocol.decode(line)
        except protocol.FrameError as exc:
            protocol.close_all(got)
            self.close()
            raise self._lost(exc) from None
        if reply.get("ok"):
            return reply.get("result"), got
        protocol.close_all(got)
        error = reply.get("error") or {}
        raise ClientError(str(error.get("code", "failed")), str(error.get("message", reply)))

    def _last_words(self) -> ClientError | None:
        """The error the daemon sent before it hung up, if it sent one."""
        assert self._reader is not None
        try:
            frame = self._reader.read(deadline=time.monotonic() + 1.0)
            if frame is not None:
                protocol.close_all(frame[1])
            reply = protocol.decode(frame[0]) if frame is not None else {}
        except (OSError, protocol.FrameError):
            return None
        error = reply.get("error")
        if reply.get("ok") is not False or not isinstance(error, dict):
            return None
        return ClientError(str(error.get("code", "failed")), str(error.get("message", "")))

    def _lost(self, exc: BaseException) -> ClientError:
        """What to tell the user when the connection failed mid-call, without errno text
        like "Broken pipe"."""
        if isinstance(exc, ConnectionError | EOFError):
            return ClientError(
                "unreachable",
                f"reqpmd at {self.path} hung up before answering; try again "
                "(if it keeps happening: systemctl status reqpmd)",
            )
        if isinstance(exc, TimeoutError):
            return ClientError(
                "unreachable",
                f"reqpmd at {self.path} did not answer in time; is it stuck? "
                "(systemctl status reqpmd)",
            )
        if isinstance(exc, protocol.FrameError):
            return ClientError("unreachable", f"reqpmd at {self.path} sent a bad reply: {exc}")
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ClientError("unreachable", f"connection to reqpmd at {self.path} failed: {text}")

    def submit(
        self,
        *,
        srpm: Path | None = None,
        spec: Path | None = None,
        sources: Path | None = None,
        chroot: str | None = None,
        priority: int = 0,
        publish: bool = True,
    ) -> int:
        """Open the files with our own rights and hand the daemon the descriptors."""
        entries: list[tuple[str, str, Path]] = []
        if srpm is not None:
            entries.append((srpm.name, "srpm", srpm))
        if spec is not None:
            entries.append((spec.name, "spec", spec))
            if sources is not None:
                for path in sorted(sources.iterdir()):
                    if path.is_file() and path.resolve() != spec.resolve():
                        entries.append((path.name, "source", path))
        fds: list[int] = []
        try:
            for _, _, path in entries:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            args: dict[str, Any] = {
                "files": [{"name": name, "role": role} for name, role, _ in entries],
                "priority": priority,
            }
            if chroot:
                args["chroot"] = chroot
            if not publish:
                args["publish"] = False
            # the daemon copies the files before it answers: allow for large uploads, so a
            # slow disk is not reported as "unreachable" for a build that was accepted
            with self._patience(SUBMIT_TIMEOUT):
                result = self.call("submit", args, fds)
        finally:
            for fd in fds:
                os.close(fd)
        return int(result["id"])

    @contextlib.contextmanager
    def _patience(self, seconds: float) -> Iterator[None]:
        """A longer timeout for calls the daemon answers only after reading whole files,
        so a slow disk is not reported as "unreachable"."""
        sock = self._connect()
        sock.settimeout(max(self.timeout, seconds))
        try:
            yield
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.timeout)

    def cleanup_now(self) -> dict[str, Any]:
        """Run the cleanup; the daemon answers when it is done."""
        with self._patience(CLEANUP_TIMEOUT):
            return dict(self.call("cleanup.run"))

    def sync_repos(self, chroot: str | None, wait: bool, full: bool = False) -> dict[str, Any]:
        """Ask for a repository sync; with ``wait``, the answer comes when it is done."""
        args: dict[str, Any] = {"wait": wait, "full": full}
        if chroot is not None:
            args["chroot"] = chroot
        with self._patience(SYNC_TIMEOUT if wait else self.timeout):
            return dict(self.call("repos.sync", args))

    def sync_project(self, name: str, wait: bool) -> dict[str, Any]:
        """Ask for a project's sync; with ``wait``, the answer says what it did."""
        with self._patience(PROJECT_TIMEOUT if wait else self.timeout):
            return dict(self.call("projects.sync", {"name": name, "wait": wait}))

    def build_project(
        self, name: str, commit: str | None = None, chroot: str | None = None
    ) -> dict[str, Any]:
        """Fetch the project and queue builds of ``commit`` (default: the branch head):
        {"name", "commit", "builds"}."""
        args: dict[str, Any] = {"name": name}
        if commit is not None:
            args["commit"] = commit
        if chroot is not None:
            args["chroot"] = chroot
        with self._patience(PROJECT_TIMEOUT):
            return dict(self.call("projects.build", args))

    def add_project(self, args: dict[str, Any]) -> dict[str, Any]:
        """The daemon fetches the repository before it answers (to refuse what cannot build)."""
        with self._patience(PROJECT_TIMEOUT):
            return dict(self.call("projects.add", args))

    def edit_project(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change a project; a new URL waits for a fetch in progress on the old clone."""
        with self._patience(PROJECT_TIMEOUT):
            return dict(self.call("projects.edit", {**changes, "name": name}))

    def remove_project(self, name: str) -> dict[str, Any]:
        """Remove a project; its clone goes once a fetch in progress on it has ended."""
        with self._patience(PROJECT_TIMEOUT):
            return dict(self.call("projects.remove", {"name": name}))

    def results(self, build_id: int) -> dict[str, Any]:
        """A build's result files, every page of them: {"id", "state", "files"}."""
        files: list[dict[str, Any]] = []
        after: str | None = None
        with self._patience(FETCH_TIMEOUT):
            while True:
                page = self.call("build.results", {"id": build_id, "after": after})
                files += page["files"]
                after = _next_cursor(page, after)
                if after is None:
                    return {"id": page["id"], "state": page["state"], "files": files}

    def fetch_page(
        self, build_id: int, *, rpms_only: bool = False, after: str | None = None
    ) -> tuple[dict[str, Any], list[int]]:
        """One build.fetch reply and its descriptors, one per entry of its "files" and in
        that order; the caller owns them and must close them."""
        args = {"id": build_id, "rpms_only": rpms_only, "after": after}
        result, fds = self.call_with_fds("build.fetch", args)
        files = result.get("files") if isinstance(result, dict) else None
        if not isinstance(files, list) or len(files) != len(fds):
            protocol.close_all(fds)
            raise ClientError(
                "failed",
                f"reqpmd sent {len(fds)} descriptors for "
                f"{len(files) if isinstance(files, list) else 'no list of'} files",
            )
        return result, fds

    def fetch(
        self, build_id: int, dest: Path, *, rpms_only: bool = False, force: bool = False
    ) -> list[dict[str, Any]]:
        """Copy a finished build's result files into ``dest`` (made if missing) and return
        them as listed, each with its "path".

        Every file is checked against the size and SHA-256 the daemon listed, and only
        once all are complete do they take their real names: a fetch that is cut off,
        refused or corrupt leaves no file under a real name. Without ``force`` an existing
        file is never replaced (ResultExists, before anything is written)."""
        with self._patience(FETCH_TIMEOUT), _Staging(dest, force) as staging:
            after: str | None = None
            while True:
                page, fds = self.fetch_page(build_id, rpms_only=rpms_only, after=after)
                try:
                    staging.add(page["files"], fds)
                finally:
                    protocol.close_all(fds)
                after = _next_cursor(page, after)
                if after is None:
                    return staging.commit()


def _next_cursor(page: dict[str, Any], after: str | None) -> str | None:
    """The cursor of the next page; a daemon whose cursor does not advance would have us
    ask for the same page for ever."""
    following = page.get("next")
    if following is None:
        return None
    if not isinstance(following, str) or (after is not None and following <= after):
        raise ClientError(
            "failed", f"reqpmd sent a paging cursor that does not advance: {shown(following)}"
        )
    return following


class _Staging:
    """Fetched files under temporary names in a directory of their own inside the
    destination (same file system: renames are atomic), moved to their real names only
    once every file is complete and checked; the directory goes whatever happens."""

    def __init__(self, dest: Path, force: bool) -> None:
        self.dest = dest
        self.force = force
        self.tmp: Path | None = None
        self.staged: list[tuple[dict[str, Any], Path]] = []
        self.names: set[str] = set()

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _dir(self) -> Path:
        """Made at the first reply, so a refused fetch (no such build) creates nothing."""
        if self.tmp is None:
            try:
                self.dest.mkdir(parents=True, exist_ok=True)
                self.tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.dest))
            except OSError as exc:
                raise _local_error(f"cannot write into {printable(str(self.dest))}", exc) from None
        return self.tmp

    def add(self, files: list[Any], fds: list[int]) -> None:
        tmp = self._dir()
        for meta, fd in zip(files, fds, strict=True):
            entry = self._checked(meta)
            target = tmp / str(len(self.staged))
            try:
                size, sha256 = _copy(fd, target)
            except OSError as exc:
                raise _local_error(f"cannot copy {printable(entry['name'])}", exc) from None
            if (size, sha256) != (entry["size"], entry["sha256"]):
                raise ClientError(
                    "failed",
                    f"{printable(entry['name'])} arrived as {size} bytes with sha256 "
                    f"{sha256}, not the {entry['size']} bytes with sha256 "
                    f"{printable(entry['sha256'])} listed; nothing was written",
                )
            self.staged.append((entry, target))

    def _checked(self, meta: Any) -> dict[str, Any]:
        """A listed file fit to write: a plain name, not listed before, with a size and a
        checksum; and, without force, no file of that name in the destination yet."""
        if not isinstance(meta, dict) or not is_plain_name(meta.get("name")):
            raise ClientError(
                "failed",
                f"reqpmd listed a result as {shown(meta)}, not under a plain file name; "
                "nothing was written",
            )
        name = str(meta["name"])
        if name in self.names:
            raise ClientError("failed", f"reqpmd listed {shown(name)} twice; nothing was written")
        if not isinstance(meta.get("size"), int) or not isinstance(meta.get("sha256"), str):
            raise ClientError("failed", f"reqpmd listed {shown(name)} without a size or sha256")
        self.names.add(name)
        if not self.force and os.path.lexists(self.dest / name):
            raise ResultExists(self.dest / name, "; nothing was written")
        return meta

    def commit(self) -> list[dict[str, Any]]:
        placed = []
        for entry, target in self.staged:
            final = self.dest / entry["name"]
            _place(target, final, self.force)
            placed.append({**entry, "path": str(final)})
        return placed


def _copy(fd: int, target: Path) -> tuple[int, str]:
    """Copy a passed descriptor into a new file: its size and SHA-256 as read. pread, not
    read: the descriptor shares its offset with the daemon's copy."""
    digest = hashlib.sha256()
    offset = 0
    with open(target, "xb") as out:
        while chunk := os.pread(fd, COPY_CHUNK, offset):
            out.write(chunk)
            digest.update(chunk)
            offset += len(chunk)
        out.flush()
        os.fsync(out.fileno())  # the rename must not outlive its data in a crash
    return offset, digest.hexdigest()


# link(2) refused by the file system itself (no hard links there)
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def _place(staged: Path, final: Path, force: bool) -> None:
    """Give a staged file its real name in one step. Without force, link(2): unlike
    rename(2) it fails on an existing name, even one that appeared since the check."""
    try:
        if force:
            os.replace(staged, final)
            return
        try:
            os.link(staged, final)
        except FileExistsError:
            raise ResultExists(final, "; not overwritten") from None
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            if os.path.lexists(final):
                raise ResultExists(final, "; not overwritten") from None
            os.rename(staged, final)
            return
        os.unlink(staged)
    except OSError as exc:
        raise _local_error(f"cannot write {printable(str(final))}", exc) from None


def _local_error(what: str, exc: OSError) -> ClientError:
    return ClientError("failed", f"{what}: {exc.strerror or exc}")
