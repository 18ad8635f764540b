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
    when unset, or set but empty; a value W&B does not take is a ``ConfigError`` (see ``checked_mode``).
    Every ``WANDB_*`` variable set but empty is removed first (a shell's empty value means unset; wandb's
    settings refused most of them, an empty ``WANDB_BASE_URL`` ended offline runs too)."""
    for name in [name for name, value in os.environ.items() if name.startswith("WANDB_") and value == ""]:
        del os.environ[name]
    explicit = os.environ.get("WANDB_MODE")
    return None if explicit is None else checked_mode(explicit, "WANDB_MODE")


def _wandb_settings() -> Any:
    """wandb's settings as a run would start from them: its settings file (``wandb login --host``;
    ``WANDB_CONFIG_DIR``/settings or ~/.config/wandb/settings), then the ``WANDB_*`` variables; raises what
    wandb raises for a setting it does not take."""
    from wandb.sdk.wandb_settings import Settings

    settings = Settings(silent=True)
    folder = os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb")
    settings.settings_system = os.path.join(os.path.expanduser(folder), "settings")
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings


def settings_refused() -> bool:
    """Whether wandb refuses its settings whatever the mode (a key with spaces around it, a bad address):
    logging offline would not help then."""
    try:
        _wandb_settings()
    except ImportError:
        return False
    except Exception:  # noqa: BLE001 - wandb's refusal, whatever its type
        return True
    return False


def _wandb_server() -> str:
    """The server wandb will use: ``WANDB_BASE_URL``, else its settings file's, else its default (that where
    the settings cannot be read: the run's start says why)."""
    from wandb.sdk.lib import urls

    try:
        return str(_wandb_settings().base_url)
    except Exception:  # noqa: BLE001 - a setting wandb refuses; it says which when the run starts
        return os.environ.get("WANDB_BASE_URL") or urls.DEFAULT_BASE_URL


def _wandb_netrc_key() -> bool | None:
    """wandb's own netrc lookup for the server it will use (``_wandb_server``): whether it finds a key; None
    where this wandb has no such lookup (another version). A key wandb refuses is a login (the run goes online
    and wandb's refusal is one line: offline, the login was ignored without a word); an address it refuses is
    none (the run's start says why)."""
    try:
        import wandb.errors
        from wandb.sdk.lib.wbauth import wbnetrc
    except ImportError:
        return None
    try:
        return bool(wbnetrc.read_netrc_auth(host=_wandb_server()))
    except wandb.errors.AuthenticationError:
        return True
    except Exception:  # noqa: BLE001 - an address wandb does not take: no credentials to go online with
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


def unreadable_netrc() -> str | None:
    """The netrc file wandb reads (``NETRC``, else ~/.netrc) when it is not UTF-8 text, else None."""
    path = os.path.expanduser(os.environ.get("NETRC") or "~/.netrc")
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
    except UnicodeDecodeError:
        return path
    except OSError:
        pass
    return None


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
