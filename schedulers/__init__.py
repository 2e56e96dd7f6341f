"""Caching policies ("cache schedulers", not noise schedulers): one module per method.

Each module defines a validated config dataclass registered with
:func:`dcache.registry.register_policy`, a state object with ``reset()``, and the decision logic.
Every module in this package is imported when the registry is first used.
"""
