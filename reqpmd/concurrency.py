"""The seed's import path for the limiter: ``from reqpmd.concurrency import
BuildConcurrencyLimiter``. The code lives in ``reqpmd.slots``."""

from reqpmd.errors import RedisUnavailable, SlotLost, SlotNameInUse, SlotTimeout, WaitCancelled
from reqpmd.slots.limiter import (
    BuildConcurrencyLimiter,
    Share,
    ShareChange,
    Slot,
    SlotInfo,
    WaiterInfo,
)

__all__ = [
    "BuildConcurrencyLimiter",
    "RedisUnavailable",
    "Share",
    "ShareChange",
    "Slot",
    "SlotInfo",
    "SlotLost",
    "SlotNameInUse",
    "SlotTimeout",
    "WaitCancelled",
    "WaiterInfo",
]
