"""The git command, run safely for the daemon: argv lists, no prompts, no hooks, no
``ext::`` transport, no submodules, a timeout on everything, credentials kept out of
what is shown.

Why the command and not a library (pygit2, dulwich): users expect their ssh config,
known_hosts and credential helpers to work for private repositories, and the command is
what honours them; it is also what every build host already has.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reqpmd.config.schema import redact_url

FETCH_TIMEOUT = 300.0  # seconds a clone or fetch may take
LOCAL_TIMEOUT = 60.0  # seconds a local command (rev-parse, archive) may take
# transports a URL may use: ext:: (runs a command) and fd:: are never allowed
ALLOWED_PROTOCOLS = "file:git:http:https:ssh"
_SCP_LIKE = re.compile(r"[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:[^\s]+")
_URL_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# -c options given to every git command: hooks never run, no fsmonitor daemon, submodules
# only when asked, ext:: refused whatever the user's config says
_SAFE_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "submodule.recurse=false",
    "fetch.recurseSubmodules=false",
    "protocol.ext.allow=never",
    "protocol.fd.allow=never",
    "credential.interactive=false",
)


# lines of git's stderr that never say why: without them, the last lines kept for the
# error are the reason ("... does not appear to be a git repository", "Permission denied
# (publickey)", "detected dubious ownership"), not what git prints after every failure
_NOISE = (
    "Cloning into ",
    "fatal: Could not read from remote repository.",
    "Please make sure you have the correct access rights",
    "and the repository exists.",
)


def _reason(err: str) -> str:
    """The last lines of git's stderr that say why it failed, on one line."""
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(_NOISE)] or lines
    return " / ".join(said[-4:])


class GitError(Exception):
    """A git command failed; the message is safe to show (credentials masked)."""


def check_url(url: object) -> str:
    """A URL git may fetch, or ValueError saying what is allowed."""
    allowed = "https://, http://, ssh://, git://, file://, user@host:path, or an absolute path"
    if not isinstance(url, str) or not url or url != url.strip() or "\n" in url or "\0" in url:
        raise ValueError(f"the git URL must be one line of text ({allowed})")
    if url.startswith("-"):
        raise ValueError("a git URL may not start with '-' (git would take it for an option)")
    if url.lower().startswith(("ext::", "fd::")) or "::" in url.split("/", 1)[0]:
        raise ValueError(f"transport helpers (ext::, fd::, ...) are not allowed; use {allowed}")
    host = url.split("://", 1)[1].rsplit("@", 1)[-1] if "://" in url else ""
    if host.startswith("-"):
        raise ValueError(
            "a git URL's host may not start with '-' (ssh would take it for an option)"
        )
    if url.startswith(_URL_SCHEMES) or _SCP_LIKE.fullmatch(url) or url.startswith("/"):
        return url
    raise ValueError(f"{shown_url(url)} is not a git URL this daemon fetches ({allowed})")


def check_branch(branch: object) -> str:
    """A branch name git accepts (``git check-ref-format --branch``), never an option."""
    if not isinstance(branch, str) or not branch or branch.startswith("-"):
        raise ValueError("a branch is a name, not empty and not starting with '-'")
    done = subprocess.run(
        ["git", "check-ref-format", "--branch", branch],
        capture_output=True,
        text=True,
        timeout=LOCAL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0 or "\n" in branch:
        raise ValueError(f"{branch!r} is not a valid branch name")
    return branch


def check_commit(commit: object) -> str:
    if not isinstance(commit, str) or not _SHA.fullmatch(commit):
        raise ValueError("a commit is given as its full id (40 or 64 hex digits)")
    return commit


def shown_url(url: str) -> str:
    """The URL as users and the journal see it: any password masked."""
    return redact_url(url)


def scrub(text: str, url: str) -> str:
    """git's output with the URL's credentials masked (git echoes URLs in errors)."""
    if url:
        text = text.replace(url, shown_url(url))
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", text)


@dataclass(frozen=True)
class Git:
    """Runs git. ``env`` adds to the daemon's environment (tests point HOME elsewhere)."""

    command: str = "git"
    env: Mapping[str, str] | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_ASKPASS": "/bin/false",
                "SSH_ASKPASS": "/bin/false",
                "GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS,
                "GIT_PROTOCOL_FROM_USER": "0",
                "LC_ALL": "C",
            }
        )
        # batch-mode ssh: a prompt for a passphrase or host key fails instead of hanging;
        # the user's ssh config still applies
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        env.update(self.env or {})
        return env

    def run(
        self,
        args: Sequence[str],
        *,
        cwd: Path | None = None,
        timeout: float = LOCAL_TIMEOUT,
        url: str = "",
        stdout: int | None = subprocess.PIPE,
    ) -> str:
        argv = [self.command]
        for option in _SAFE_CONFIG:
            argv += ["-c", option]
        argv += list(args)
        try:
            # a session of its own: on a timeout, ssh and credential helpers go with git
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise GitError(f"{self.command}: not found (install git)") from None
        try:
            out, err_bytes = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise GitError(f"git {args[0]} took longer than {timeout:.0f} s") from None
        err = scrub(err_bytes.decode("utf-8", "replace").strip(), url)
        if proc.returncode != 0:
            why = _reason(err) or "no output"
            raise GitError(f"git {args[0]} failed ({proc.returncode}): {why}")
        return out.decode("utf-8", "replace") if out is not None else ""

    # -- clones ------------------------------------------------------------------------

    def mirror(self, url: str, clone: Path) -> None:
        """Make ``clone`` a bare mirror of ``url``, or bring it up to date. A clone made
        half-way (a crash) is made again."""
        if (clone / "HEAD").exists() and (clone / ".reqpm-complete").exists():
            self.run(
                ["fetch", "--prune", "--no-recurse-submodules", "origin"],
                cwd=clone,
                timeout=FETCH_TIMEOUT,
                url=url,
            )
            return
        if clone.exists():
            shutil.rmtree(clone)
        clone.parent.mkdir(parents=True, exist_ok=True)
        self.run(
            ["clone", "--mirror", "--no-hardlinks", "--", url, str(clone)],
            timeout=FETCH_TIMEOUT,
            url=url,
        )
        (clone / ".reqpm-complete").touch()

    def head_branch(self, clone: Path, url: str = "") -> str:
        """The remote's default branch as it is now (``ls-remote --symref``: a remote that
        renamed its default branch is followed); the mirror's HEAD if that cannot say."""
        with contextlib.suppress(GitError):
            out = self.run(
                ["ls-remote", "--symref", "origin", "HEAD"],
                cwd=clone,
                timeout=FETCH_TIMEOUT,
                url=url,
            )
            for line in out.splitlines():
                ref, _, name = line.partition("\t")
                if ref.startswith("ref: refs/heads/") and name == "HEAD":
                    return ref.removeprefix("ref: refs/heads/")
        ref = self.run(["symbolic-ref", "--quiet", "HEAD"], cwd=clone).strip()
        return ref.removeprefix("refs/heads/")

    def resolve(self, clone: Path, branch: str) -> str:
        """The commit id the branch points at; GitError if there is no such branch."""
        try:
            out = self.run(
                ["rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}"],
                cwd=clone,
            )
        except GitError:
            raise GitError(f"the repository has no branch {branch!r}") from None
        return out.strip()

    def has_commit(self, clone: Path, commit: str) -> bool:
        try:
            self.run(["cat-file", "-e", f"{commit}^{{commit}}"], cwd=clone)
        except GitError:
            return False
        return True

    def files_at(self, clone: Path, commit: str, directory: str = "") -> list[str]:
        """Paths of the files in ``directory`` (top level if empty) at ``commit``."""
        spec = f"{commit}:{directory}" if directory else commit
        out = self.run(["ls-tree", "--name-only", "-z", spec], cwd=clone)
        return [name for name in out.split("\0") if name]

    def archive(self, clone: Path, commit: str, directory: str, out: Path) -> None:
        """Write a tar of ``directory`` at ``commit`` (the whole tree if empty) to ``out``."""
        tree = f"{commit}:{directory}" if directory else commit
        with open(out, "wb") as f:
            self.run(["archive", "--format=tar", tree], cwd=clone, stdout=f.fileno())
