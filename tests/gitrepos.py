"""Real git repositories for the project tests: a bare "remote" and a work tree that
commits and pushes to it, as a packager would."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

GIT_ENV = {
    "GIT_AUTHOR_NAME": "packager",
    "GIT_AUTHOR_EMAIL": "packager@example.invalid",
    "GIT_COMMITTER_NAME": "packager",
    "GIT_COMMITTER_EMAIL": "packager@example.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {done.stderr}")
    return done.stdout.strip()


class Upstream:
    """A bare repository at ``bare`` (reached as file://) and a work tree pushing to it."""

    def __init__(self, root: Path, branch: str = "main") -> None:
        if shutil.which("git") is None:
            pytest.skip("git is not installed")
        self.bare = root / "upstream.git"
        self.work = root / "work"
        self.branch = branch
        git("init", "--bare", "-b", branch, str(self.bare))
        git("init", "-b", branch, str(self.work))
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def commit(self, files: dict[str, str | bytes], message: str = "change") -> str:
        """Write the files (path -> content), commit and push; the new commit's id."""
        for name, content in files.items():
            path = self.work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", message, cwd=self.work)
        git("push", "-q", "origin", self.branch, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)


def spec(name: str = "greet", version: str = "1", release: str = "1", source: bool = True) -> str:
    """A small noarch spec; with ``source``, it installs Source0 (``<name>.sh``)."""
    lines = [
        f"Name: {name}",
        f"Version: {version}",
        f"Release: {release}",
        "Summary: a project's package",
        "License: MIT",
        "BuildArch: noarch",
    ]
    if source:
        lines.append(f"Source0: {name}.sh")
    lines += ["%description", "test", "%prep", "%build", "%install"]
    if source:
        lines.append(f"install -Dm 0755 %{{SOURCE0}} %{{buildroot}}%{{_bindir}}/{name}")
        lines += ["%files", f"%{{_bindir}}/{name}"]
    else:
        lines += ["%files"]
    return "\n".join(lines) + "\n"
