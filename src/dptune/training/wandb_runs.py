"""Weights & Biases outside the logger: the mode a run logs in (online only when wandb finds credentials,
never a login prompt) and the end of the run a command started."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    """``online`` only when credentials exist; never a login prompt, never a hang waiting for one.

    An explicit ``WANDB_MODE`` wins.
    """
    explicit = environment_mode()
    if explicit is not None:
        return explicit
    return "online" if has_credentials() else "offline"


def environment_mode() -> str | None:
    """``WANDB_MODE`` as W&B will read it (wandb reads the variable whatever mode a logger is given): None
    when unset, or set but empty, which is then removed (a shell's empty value means unset; wandb refused it
    with a traceback); a value W&B does not take is a ``ConfigError`` (see ``checked_mode``)."""
    explicit = os.environ.get("WANDB_MODE")
    if explicit == "":
        del os.environ["WANDB_MODE"]
        return None
    return None if explicit is None else checked_mode(explicit, "WANDB_MODE")


def _wandb_netrc_key() -> bool | None:
    """wandb's own netrc lookup for the server it will use (``WANDB_BASE_URL``, else its default): whether it
    finds a key; None where this wandb has no such lookup (another version), False where it refuses the
    address or the entry (it says why when the run starts)."""
    try:
        from wandb.sdk.lib import urls
        from wandb.sdk.lib.wbauth import wbnetrc
    except ImportError:
        return None
    try:
        return bool(wbnetrc.read_netrc_auth(host=os.environ.get("WANDB_BASE_URL") or urls.DEFAULT_BASE_URL))
    except Exception:  # noqa: BLE001 - an address or key wandb does not take: no credentials to go online with
        return False


def _netrc_key() -> bool:
    """Without wandb's lookup: an entry with a password in the netrc file (``NETRC``, else ``~/.netrc``) for
    ``WANDB_BASE_URL``'s host:port, else for api.wandb.ai; a file that cannot be read or parsed holds none."""
    import netrc

    try:
        entries = netrc.netrc(os.path.expanduser(os.environ.get("NETRC") or "~/.netrc"))
        machine = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    except (OSError, ValueError, netrc.NetrcParseError):  # ValueError: a file that is not text, a bad URL
        return False
    found = entries.authenticators(machine) if machine else None
    return bool(found and found[2])


def has_credentials() -> bool:
    """Whether W&B finds credentials without asking (dptune's default mode is online only then):
    ``WANDB_API_KEY``, an identity token file, or the netrc entry wandb's own lookup finds for the server it
    will use (``_wandb_netrc_key``; ``_netrc_key`` where this wandb has none). A server chosen only with
    ``wandb login --host`` (wandb's settings file) is not read: set ``WANDB_MODE=online`` or
    ``WANDB_BASE_URL`` there."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    found = _wandb_netrc_key()
    return _netrc_key() if found is None else found


# the modes wandb 0.31 takes (its Settings.mode); "dryrun" and "run" are old names of offline and online
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def checked_mode(mode: str, where: str) -> str:
    """``mode`` when W&B takes it; else a ``ConfigError`` naming where it was given (wandb refused it
    with a traceback from its settings)."""
    if mode not in WANDB_MODES:
        from dptune.errors import ConfigError

        raise ConfigError(f"{where} {mode!r}: W&B takes one of {', '.join(WANDB_MODES[:4])}")
    return mode


def current_wandb_run() -> Any:
    """The W&B run in progress in this process (``wandb.run``), None without one or without wandb loaded."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def finish_wandb_run(before: Any, exit_code: int) -> None:
    """End the W&B run a command started (one other than ``before``, the run in progress when it began),
    marked with the command's exit status. Left open, the next command in the same process (a notebook
    calling ``dptune.cli.main`` twice) attached to it and logged into the first run's folder, and a run
    that stopped on bad data was marked as finished with exit code 0 when the process exited."""
    run = current_wandb_run()
    if run is None or run is before:
        return
    try:
        run.finish(exit_code=exit_code)
    except (Exception, KeyboardInterrupt) as e:  # the command's own outcome stands; a run left open is said
        folder = os.path.dirname(getattr(run, "dir", "") or "")
        why = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else str(e)
        log.warning("the W&B run %s was not closed (%s)%s", getattr(run, "id", "?"), why,
                    f"; what it logged is in {folder}: wandb sync {folder}" if folder else "")
