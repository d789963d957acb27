"""The ``collector`` command: thin wrappers that call library functions.

Every command takes ``--config FILE`` (or ``$COLLECTOR_CONFIG``); environment variables
``COLLECTOR_<SECTION>_<KEY>`` override the file. Errors print one line on stderr and exit
non-zero (2 for configuration errors).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from collector.config import Settings, load_settings, resolve_secret
from collector.errors import CollectorError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(exc: CollectorError) -> None:
    click.echo(f"collector: {exc.detail}", err=True)
    sys.exit(exc.exit_code)


def with_settings(func: F) -> F:
    """Add ``--config`` and pass loaded settings as the first argument."""

    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar="COLLECTOR_CONFIG",
        help="TOML config file (default: none, safe defaults).",
    )
    @functools.wraps(func)
    def wrapper(config_path: str | None, **kwargs: Any) -> Any:
        try:
            settings = load_settings(config_path)
            return func(settings, **kwargs)
        except CollectorError as exc:
            _fail(exc)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="collector")
def main() -> None:
    """Consent-gated statistics pixel: collector, privacy operations and statistics."""


@main.command()
@with_settings
@click.option("--host", help="Bind address (server.host).")
@click.option("--port", type=int, help="Port (server.port).")
@click.option("--workers", type=int, help="Worker processes (server.workers).")
def serve(settings: Settings, host: str | None, port: int | None, workers: int | None) -> None:
    """Run the collector with uvicorn (uvloop, httptools)."""
    import uvicorn

    from collector.logs import configure_logging

    server = dataclasses.replace(
        settings.server,
        host=host or settings.server.host,
        port=port or settings.server.port,
        workers=workers or settings.server.workers,
    )
    configure_logging(server)
    # Create the generated secret once, before workers race for it; they read the file.
    resolve_secret(settings)
    # Workers rebuild the app from the config file and the environment.
    if settings.source != "defaults":
        os.environ["COLLECTOR_CONFIG"] = os.path.abspath(settings.source)
    uvicorn.run(
        "collector.app:app_from_environment",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        # We resolve client IPs ourselves from server.trusted_proxies; uvicorn's own
        # handling trusts 127.0.0.1 by default, which would let any local client spoof.
        proxy_headers=False,
        server_header=False,
        access_log=server.access_log,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


@main.command("consent-cookie")
@with_settings
@click.option(
    "--purposes",
    default="statistics",
    show_default=True,
    help="Comma-separated: statistics, advertising (empty for a refusal).",
)
def consent_cookie(settings: Settings, purposes: str) -> None:
    """Print a valid consent cookie (name=value) for testing and first curls."""
    from collector.consent import ConsentCodec, purposes_from_names

    names = [p.strip() for p in purposes.split(",") if p.strip()]
    try:
        bits = purposes_from_names(names)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--purposes") from None
    settings = resolve_secret(settings)
    codec = ConsentCodec(settings.consent)
    click.echo(f"{settings.consent.cookie_name}={codec.encode(codec.issue(bits))}")


@main.command("check-config")
@with_settings
def check_config(settings: Settings) -> None:
    """Validate the configuration and print the effective settings (secrets redacted)."""
    import json

    from collector.logs import redact

    click.echo(json.dumps(redact(settings), indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    main()
