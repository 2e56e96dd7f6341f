"""Compatibility: the hook wrapper lives in :mod:`dcache.wrapper`."""

from dcache.wrapper import Hook, install, is_hooked  # noqa: F401
