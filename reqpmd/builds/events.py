"""One way to log what happened to a build: the message starts with the build, and the
record carries ``build_id`` (the journal's REQPM_BUILD_ID field), so
``journalctl REQPM_BUILD_ID=12`` finds every line of build 12."""

from __future__ import annotations

import logging

log = logging.getLogger("reqpmd.builds")


def build_event(build_id: int, message: str, level: int = logging.INFO) -> None:
    log.log(level, "build %d: %s", build_id, message, extra={"build_id": build_id})
