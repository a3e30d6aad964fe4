"""The control socket: protocol (the wire format, shared with reqpmctl), server (accept,
identify the peer, frame requests), operations (what may be asked, by which role),
submission (checking what a submitter sends)."""
