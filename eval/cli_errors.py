"""Bad command-line input as one clear line and a non-zero exit, checked before any work starts.

Every ``dcache`` subcommand shares these checks, so the same mistake reads the same everywhere.
:class:`UsageError` is a ``ValueError`` (the API contract for bad input); :func:`guarded` turns it,
argparse's own errors and Ctrl-C into ``dcache <cmd>: error: <one line>`` on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

__all__ = ["UsageError", "ArgParser", "guarded", "check_out_dir", "check_device", "check_number",
           "check_existing_dir", "check_model", "check_policy_list", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_USAGE = 2  # argparse's own convention for bad arguments
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_FAILED = 1


class UsageError(ValueError):
    """Bad user input; the message is one line that names what is accepted."""


class ArgParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting.

    Defaults are shown in ``--help`` and the description/epilog keep their line breaks (examples).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" / "(default: False)" / "(default: [])" say nothing; keep real defaults only.
        if action.default in (None, False, [], argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def guarded(prog: str, fn: Callable[[], int | None], out_hint: Callable[[], str | None] = lambda: None) -> int:
    """Run ``fn``; bad input, Ctrl-C and unexpected failures end in one line on stderr and a code.

    Set ``DCACHE_DEBUG=1`` to see the traceback of an unexpected failure instead.
    """
    try:
        return int(fn() or 0)
    except UsageError as e:
        _say(prog, str(e))
        return EXIT_USAGE
    except SystemExit as e:  # an inner argparse parser (e.g. a bench's own) already printed its line
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        if isinstance(e.code, str):
            _say(prog, e.code)
        return code
    except KeyboardInterrupt:
        hint = out_hint()
        where = f"; finished samples are kept in {hint} (run the same command again to resume)" if hint else ""
        _say(prog, f"interrupted{where}")
        return EXIT_INTERRUPTED
    except ValueError as e:  # the API's bad-input contract: a ValueError with a one-line message
        if os.environ.get("DCACHE_DEBUG"):
            raise
        _say(prog, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - a CLI never ends in a traceback unless asked to
        if os.environ.get("DCACHE_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        _say(prog, f"failed: {type(e).__name__}: {msg} (set DCACHE_DEBUG=1 for the traceback)")
        return EXIT_FAILED


def _say(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def check_number(name: str, value: float | None, minimum: float, *, integer: bool = False) -> None:
    """``value >= minimum`` (None means "not given" and passes)."""
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    if value < minimum:
        raise UsageError(f"{name} must be {kind} >= {minimum:g}, got {value:g}")


def check_out_dir(path: str, flag: str = "--out") -> None:
    """``path`` is, or can become, a writable directory (nothing is created here)."""
    if not path:
        raise UsageError(f"{flag} must name a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file, not a directory; name a new or existing directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} {path!r} cannot be created: {probe!r} is a file")
    # Probe by writing: permission bits say nothing for root or on a read-only mount.
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=".dcache-probe-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UsageError(f"{flag} {path!r} is not writable ({e.strerror} in {probe!r})") from None


def check_device(device: str) -> None:
    """A device torch accepts and that exists on this machine."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r} is not a device; accepted: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device!r} is unavailable: torch sees no CUDA GPU here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device!r} is unavailable: {torch.cuda.device_count()} CUDA device(s) here")
        return
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {device!r} is unavailable on this machine; use --device cpu")
        return
    raise UsageError(f"--device {device!r} is not supported; accepted: cpu, cuda, cuda:N, mps")


def check_existing_dir(path: str | None, flag: str) -> None:
    if path is None:
        return
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise UsageError(f"{flag} {path!r} {what}; give an existing directory")


def check_model(model: str | None, builtin: Sequence[str]) -> None:
    """A built-in model name, a local directory, or something shaped like a hub id (``org/name``).

    A path-looking value that is not a directory fails here, not after a baseline run.
    """
    if model is None or model in builtin:
        return
    if os.path.isdir(model):
        return
    if os.path.exists(model):
        raise UsageError(f"--model {model!r} is a file; give a pipeline directory or a hub id (org/name)")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        known = f"; built-in models: {', '.join(builtin)}" if builtin else ""
        raise UsageError(f"--model {model!r}: no such directory, and not a hub id (org/name){known}")
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "YES", "yes"):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "model_index.json")
        except Exception:  # noqa: BLE001 - a malformed id is reported below
            cached = None
        if not isinstance(cached, str):
            raise UsageError(f"--model {model!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                             "downloading it; give a local directory")


def check_policy_list(spec: str, task: str, flag: str = "--policies",
                      extra_names: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """Parse a policy list with the shared syntax; a bad one is a one-line :class:`UsageError`."""
    from dcache.eval import policy_spec

    try:
        return policy_spec.parse_policies(spec, task=task, extra_names=extra_names)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None
    except TypeError as e:  # a policy config refusing a value of the wrong type
        raise UsageError(f"{flag}: {e}") from None
