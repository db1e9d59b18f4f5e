"""Connecting to Ray from the training commands, and keeping the libraries' output on stderr.

The commands write their own report (stage lines, progress, tables) to stdout and leave stderr to
Ray, DeepSpeed and the other libraries, so that ``2> file`` (what ``jobs/demo.py`` does per stage)
separates the two. Ray logs to stderr already, and so do its actors' forwarded log lines.

Ray runs with token authentication. With it switched off (``RAY_AUTH_MODE=disabled``) every
Serve replica runs a plaintext gRPC server on all interfaces that unpickles what a caller sends,
and any local process attaches a driver: ``init_ray`` refuses that unless the user opted in
(``--allow-no-auth``, :func:`permit_no_auth`). A private instance gets a fresh random token of
its own (``RAY_AUTH_TOKEN`` in this process and so in Ray's processes), unless a token is given
(``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``); nothing is written to ``~/.ray``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Iterator


LOOPBACK = "127.0.0.1"
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray reads these three
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
NO_AUTH_FLAG = "--allow-no-auth"
_no_auth = {"permitted": False}  # set once by the command line (``NO_AUTH_FLAG``)


class AuthOff(RuntimeError):
    """Ray's token authentication is switched off and the user did not allow it."""


def add_no_auth_flag(parser: argparse.ArgumentParser) -> None:
    """The opt-in of a command that starts or joins Ray (``atspeed_ray.cli`` acts on it)."""
    parser.add_argument(NO_AUTH_FLAG, dest="allow_no_auth", action="store_true",
                        help=f"start or join a Ray with {AUTH_MODE_ENV}=disabled (unsafe: anyone who "
                             "reaches its ports runs code as you)")


def permit_no_auth() -> None:
    """The user's explicit opt-in: this process may start or join a Ray without authentication."""
    _no_auth["permitted"] = True


def check_auth() -> None:
    """Raise :class:`AuthOff` (one line) if ``RAY_AUTH_MODE`` switches token auth off without
    the opt-in."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token" and not _no_auth["permitted"]:
        raise AuthOff(f"{AUTH_MODE_ENV}={mode} switches Ray's token authentication off, so anyone "
                      f"who reaches Ray's ports can run code as this user; unset it (token auth "
                      f"is the default) or pass {NO_AUTH_FLAG}")


def private_token() -> None:
    """Token auth for a private instance started from this process: mode ``token`` unless the
    user switched it off, and a fresh random token in ``RAY_AUTH_TOKEN`` unless one is given.
    Ray's processes inherit both; Ray caches them, so it re-reads them here."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.setdefault(AUTH_MODE_ENV, "token")
    if os.environ[AUTH_MODE_ENV].lower() == "token" and not (
            os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_PATH_ENV)):
        os.environ[TOKEN_ENV] = secrets.token_hex(32)  # 256 bits, as Ray's own generator
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# Ray starts its worker processes at niceness 15 unless told otherwise (``RAY_worker_niceness``;
# its job manager sets 0 for jobs). On a private instance the workers do the user's own command
# (training, serving), so they run at the user's priority: at 15, a busy process beside them
# (another job, a CPU hog) takes nearly all of a core and a demo beside one never finished.
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def unniced_workers() -> None:
    """Workers of a private instance at the driver's niceness (unless the user set one)."""
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")


def init_ray(address: str | None = None, num_cpus: int | None = None,
             include_dashboard: bool = True, namespace: str | None = None,
             object_store_memory: int | None = None) -> None:
    """Connect to Ray once.

    Inside ``ray job submit`` (``RAY_ADDRESS`` is set) or with an explicit ``address`` it joins
    that cluster. Otherwise it starts a private local instance (``address="local"``) rather than
    attaching to whatever cluster happens to run on this machine. The dashboard stays on: Ray
    Train V2 logs a flood of warnings without it. The private instance listens on loopback only
    (``loopback_only``) and with a token of its own (``private_token``); its workers run at the
    user's priority (``unniced_workers``). Auth switched off is refused unless permitted
    (``check_auth``).
    """
    import ray

    if ray.is_initialized():
        return
    check_auth()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, namespace=namespace)
    else:
        private_token()
        unniced_workers()
        with loopback_only():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                     log_to_driver=True, namespace=namespace,
                     object_store_memory=object_store_memory, dashboard_host=LOOPBACK)


# Ray's single-machine mode (its default on macOS and Windows): the node address is 127.0.0.1,
# and with it GCS, raylet, object manager, workers and agents listen on loopback only.
# ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: Ray swaps a loopback address for
# the machine's reachable one.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Single-machine mode while a local instance starts (its processes inherit it); restored
    afterwards, so that a later ``ray start`` from this process is not refused."""
    from ray._private import ray_constants

    saved_env, saved = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; ray is imported by now
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[None]:
    """DeepSpeed prints its setup messages (``... built successfully``) and logs through a handler
    on stdout: send both to stderr while it is set up (and its logger for good)."""
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        yield
