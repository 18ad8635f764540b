"""Weights & Biases outside the logger: the mode a run logs in (online only when wandb finds credentials,
never a login prompt) and the end of the run a command started."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    """``online`` only when credentials exist; never a login prompt, never a hang waiting for one.

    An explicit ``WANDB_MODE`` wins, then an offline or disabled mode wandb's settings files hold
    (``wandb offline``, ``wandb disabled``; ``wandb enabled`` writes ``online``, which goes online only with
    credentials, as no setting does).
    """
    explicit = environment_mode()
    if explicit is not None:
        return explicit
    settings = _settings_or_none()
    if settings is not None and "mode" in settings.model_fields_set and str(settings.mode) not in ("online", "run"):
        return checked_mode(str(settings.mode), "wandb's settings file: mode")
    return "online" if has_credentials(settings) else "offline"


def environment_mode() -> str | None:
    """``WANDB_MODE`` as W&B will read it (wandb reads the variable whatever mode a logger is given): None
    when unset, or set but empty; a value W&B does not take is a ``ConfigError`` (see ``checked_mode``).
    Every ``WANDB_*`` variable set but empty is removed first (a shell's empty value means unset; wandb's
    settings refused most of them, an empty ``WANDB_BASE_URL`` ended offline runs too)."""
    for name in [name for name, value in os.environ.items() if name.startswith("WANDB_") and value == ""]:
        del os.environ[name]
    explicit = os.environ.get("WANDB_MODE")
    return None if explicit is None else checked_mode(explicit, "WANDB_MODE")


@contextmanager
def _quiet_wandb() -> Iterator[None]:
    """wandb's terminal lines held back (its own report of a bad settings file comes when the run starts:
    read here too, it was printed twice, and once more per process)."""
    try:
        from wandb.errors import term

        before, said = term._silent, set(term._printed_messages)
    except (ImportError, AttributeError):  # another wandb: its lines are printed
        yield
        return
    term._silent = True
    try:
        yield
    finally:
        # wandb remembers its once-only lines even when silent: forgotten again, so that the run's start says them
        term._silent = before
        term._printed_messages.intersection_update(said)


def _wandb_settings() -> Any:
    """wandb's settings as a run would start from them: its settings files (``wandb login --host``,
    ``wandb offline``: ``WANDB_CONFIG_DIR``/settings or ~/.config/wandb/settings, and ./wandb/settings), then
    the ``WANDB_*`` variables; raises what wandb raises for a setting it does not take."""
    from wandb.sdk.wandb_settings import Settings

    with _quiet_wandb():
        settings = Settings(silent=True)
        settings.settings_system = _settings_file()
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
    return settings


def _settings_file() -> str:
    """wandb's own settings file: ``WANDB_CONFIG_DIR``/settings, else ~/.config/wandb/settings."""
    folder = os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb")
    return os.path.join(os.path.expanduser(folder), "settings")


def _netrc_file() -> str:
    """The netrc file wandb reads: ``NETRC``, else ~/.netrc."""
    return os.path.expanduser(os.environ.get("NETRC") or "~/.netrc")


def _settings_or_none() -> Any:
    """``_wandb_settings``, or None where wandb is missing or refuses them (the run's start says why)."""
    try:
        return _wandb_settings()
    except Exception:  # noqa: BLE001 - wandb's refusal, whatever its type
        return None


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


def _wandb_server(settings: Any = None) -> str:
    """The server wandb will use: ``WANDB_BASE_URL``, else its settings file's, else its default (that where
    the settings cannot be read: the run's start says why)."""
    from wandb.sdk.lib import urls

    settings = settings if settings is not None else _settings_or_none()
    return str(settings.base_url) if settings is not None else os.environ.get("WANDB_BASE_URL") or urls.DEFAULT_BASE_URL


def _wandb_netrc_key(settings: Any = None) -> bool | None:
    """wandb's own netrc lookup for the server it will use (``_wandb_server``): whether it finds a key; None
    where this wandb has no such lookup (another version). A key wandb refuses is a login (the run goes online
    and wandb's refusal is one line: offline, the login was ignored without a word); an address it refuses is
    none (the run's start says why); a netrc that is not text is none, said in a warning."""
    try:
        import wandb.errors
        from wandb.sdk.lib.wbauth import wbnetrc
    except ImportError:
        return None
    try:
        with _quiet_wandb():
            return bool(wbnetrc.read_netrc_auth(host=_wandb_server(settings)))
    except wandb.errors.AuthenticationError:
        return True
    except UnicodeDecodeError:
        log.warning("W&B: %s is not a text file: no credentials read from it; the run logs offline",
                    unreadable_file() or "the netrc file")
        return False
    except Exception:  # noqa: BLE001 - an address wandb does not take: no credentials to go online with
        return False


def _netrc_key() -> bool:
    """Without wandb's lookup: an entry with a password in the netrc file (``NETRC``, else ``~/.netrc``) for
    ``WANDB_BASE_URL``'s host:port, else for api.wandb.ai; a file that cannot be read or parsed holds none."""
    import netrc

    try:
        entries = netrc.netrc(_netrc_file())
        machine = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    except (OSError, ValueError, netrc.NetrcParseError):  # ValueError: a file that is not text, a bad URL
        return False
    found = entries.authenticators(machine) if machine else None
    return bool(found and found[2])


def unreadable_file() -> str | None:
    """The first file wandb reads as text that is not UTF-8: its netrc (``NETRC``, else ~/.netrc) or a settings
    file (``WANDB_CONFIG_DIR``/settings or ~/.config/wandb/settings, ./wandb/settings); None if none is."""
    for path in (_netrc_file(), _settings_file(),
                 os.path.join("wandb", "settings")):  # the working folder's (read before WANDB_DIR applies)
        try:
            with open(path, encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError:
            return path
        except OSError:
            continue
    return None


def has_credentials(settings: Any = None) -> bool:
    """Whether W&B finds credentials without asking (dptune's default mode is online only then):
    ``WANDB_API_KEY``, an identity token file, a key in wandb's settings (``settings``: ``_wandb_settings``,
    read when not given), or the netrc entry wandb's own lookup finds for the server it will use
    (``WANDB_BASE_URL``, else its settings file's, else its default; ``_netrc_key`` where this wandb has no
    lookup)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = settings if settings is not None else _settings_or_none()
    if settings is not None and getattr(settings, "api_key", None):
        return True
    found = _wandb_netrc_key(settings)
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
