"""The farm cleaning up after itself: old builds (retention), mock roots left by crashes
(orphans), and the hourly job that runs both, at once when the disk runs short."""
