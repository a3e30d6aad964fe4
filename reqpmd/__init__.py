"""reqpmd: the reqpm build daemon and its cluster-wide build-slot limiter."""

__version__ = "0.1.0"
