"""The ``collector`` command: thin wrappers that call library functions.

Every command takes ``--config FILE`` (or ``$COLLECTOR_CONFIG``); environment variables
``COLLECTOR_<SECTION>_<KEY>`` override the file. Errors print one line on stderr and exit
non-zero (2 for configuration errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import getpass
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from collector.config import ServerSettings, Settings, load_settings, resolve_secret
from collector.dimensions import DIMENSIONS
from collector.errors import CollectorError, InputError

if TYPE_CHECKING:
    from collector.audit import AuditLog
    from collector.storage.base import Storage

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


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
@click.option("--demo", is_flag=True, help="Serve the demo store at /demo/ (server.demo).")
def serve(
    settings: Settings, host: str | None, port: int | None, workers: int | None, demo: bool
) -> None:
    """Run the collector with uvicorn (uvloop, httptools)."""
    if demo:
        # Workers rebuild their settings from the environment.
        os.environ["COLLECTOR_SERVER_DEMO"] = "true"

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
    writer = None
    if settings.storage.backend == "sqlite" and settings.storage.writer_process:
        from collector.writer_process import SOCKET_ENV, WriterProcess

        writer = WriterProcess()
        os.environ[SOCKET_ENV] = writer.start()
    try:
        _run_uvicorn(server)
    finally:
        # Reached on a normal return; when uvicorn re-raises SIGTERM after its graceful
        # exit, the writer process sees its stdin close and finishes by itself.
        if writer is not None:
            writer.stop()


def _run_uvicorn(server: ServerSettings) -> None:
    import uvicorn

    from collector.protocol import PixelProtocol

    uvicorn.run(
        "collector.app:app_from_environment",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        loop="uvloop",
        # httptools either way; PixelProtocol answers the pixel without an ASGI cycle.
        http=PixelProtocol if server.fast_path else "httptools",
        lifespan="on",
        # We resolve client IPs ourselves from server.trusted_proxies; uvicorn's own
        # handling trusts 127.0.0.1 by default, which would let any local client spoof.
        proxy_headers=False,
        server_header=False,
        access_log=server.access_log,
        log_config=None,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=server.keep_alive_s,
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


def run_with_storage(settings: Settings, job: Callable[[CliContext], Awaitable[T]]) -> T:
    """Open storage (migrating it), run ``job``, close; errors become one line + exit."""
    from collector.audit import AuditLog
    from collector.storage import open_storage

    settings = resolve_secret(settings)

    async def run() -> T:
        storage = open_storage(settings)
        await storage.open()
        try:
            return await job(
                CliContext(settings, storage, AuditLog(storage, settings.consent.secret))
            )
        finally:
            await storage.close()

    try:
        return asyncio.run(run())
    except CollectorError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


class CliContext:
    def __init__(self, settings: Settings, storage: Storage, audit: AuditLog) -> None:
        self.settings = settings
        self.storage = storage
        self.audit = audit
        self.actor = f"cli:{getpass.getuser()}"

    @contextlib.asynccontextmanager
    async def audited(
        self, action: str, subject: str | None = None, detail: dict[str, Any] | None = None
    ) -> AsyncIterator[None]:
        """Record ``action`` with its outcome, failed attempts included (5.5)."""
        try:
            yield
        except CollectorError as exc:
            await self.audit.record(
                actor=self.actor,
                action=action,
                subject=subject,
                outcome="error",
                detail={**(detail or {}), "error": exc.detail},
            )
            raise
        await self.audit.record(actor=self.actor, action=action, subject=subject, detail=detail)


@main.group()
def token() -> None:
    """API tokens: create (shown once), list, revoke."""


@token.command("create")
@with_settings
@click.option("--role", type=click.Choice(["analyst", "engineer", "admin"]), required=True)
@click.option("--name", required=True, help="Who or what holds the token.")
def token_create(settings: Settings, role: str, name: str) -> None:
    """Create a token and print it once; only its hash is stored."""
    from collector.auth import TokenStore

    async def job(ctx: CliContext) -> str:
        async with ctx.audited("token.create", name, {"role": role}):
            return await TokenStore(ctx.storage).create(name, role)

    click.echo(run_with_storage(settings, job))


@token.command("list")
@with_settings
def token_list(settings: Settings) -> None:
    """List tokens (names, roles, prefixes; never the tokens)."""
    from collector.auth import TokenStore

    async def job(ctx: CliContext) -> list[dict[str, Any]]:
        return await TokenStore(ctx.storage).list()

    rows = run_with_storage(settings, job)
    click.echo(f"{'NAME':<24} {'ROLE':<9} {'PREFIX':<11} {'CREATED':<20} REVOKED")
    for r in rows:
        click.echo(
            f"{r['name']:<24} {r['role']:<9} {r['prefix']:<11} {_when(r['created_at']):<20} "
            f"{_when(r['revoked_at']) if r['revoked_at'] else '-'}"
        )


@token.command("revoke")
@with_settings
@click.argument("name")
def token_revoke(settings: Settings, name: str) -> None:
    """Revoke a token by name (effective within a second on running servers)."""
    from collector.auth import TokenStore

    async def job(ctx: CliContext) -> None:
        async with ctx.audited("token.revoke", name):
            await TokenStore(ctx.storage).revoke(name)

    run_with_storage(settings, job)
    click.echo(f"revoked {name}")


@main.group()
def audit() -> None:
    """The audit trail: list records, verify the hash chain."""


@audit.command("list")
@with_settings
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--action", help="Only this action, e.g. ip.lookup.")
@click.option("--subject", help="Only records about this subject (an IP, a visitor id).")
def audit_list(settings: Settings, limit: int, action: str | None, subject: str | None) -> None:
    """Newest records first."""

    async def job(ctx: CliContext) -> list[dict[str, Any]]:
        return await ctx.audit.entries(limit=limit, action=action, subject=subject)

    for r in run_with_storage(settings, job):
        click.echo(
            f"{r['id']:>6} {_when(r['ts_ms'])} {r['actor']:<20} {r['role'] or '-':<8} "
            f"{r['action']:<16} {r['subject'] or '-':<20} {r['outcome']}"
        )


@audit.command("verify")
@with_settings
def audit_verify(settings: Settings) -> None:
    """Check the hash chain; exit 1 at the first record that does not fit."""
    from collector.audit import VerifyResult

    async def job(ctx: CliContext) -> VerifyResult:
        return await ctx.audit.verify()

    result = run_with_storage(settings, job)
    if result.ok:
        click.echo(f"audit chain intact: {result.checked} records")
        return
    click.echo(
        f"collector: audit chain broken at record {result.bad_id}: {result.reason} "
        f"({result.checked} records before it are intact)",
        err=True,
    )
    sys.exit(1)


@main.command("ip")
@with_settings
@click.argument("address", required=False)
@click.option("--top", "top_n", type=click.IntRange(1, 10_000), help="The N most suspicious.")
@click.option("--date", help="UTC day YYYY-MM-DD (default: latest with data / today).")
@click.option("--kind", type=click.Choice(["ip", "network"]), default="ip", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text")
def ip_command(
    settings: Settings,
    address: str | None,
    top_n: int | None,
    date: str | None,
    kind: str,
    fmt: str,
) -> None:
    """IP statistics for fraud control and support (3.3.2): one IP, or --top N.

    Audited as the CLI user with the IP looked up (5.5), like the engineer API.
    """
    import json

    from collector import ipreport
    from collector.api.ip import DAY_COLUMNS, TOP_COLUMNS, to_csv
    from collector.enrich import normalize_ip
    from collector.geo import GeoIP

    if (address is None) == (top_n is None):
        raise click.UsageError("give an IP address or --top N")

    async def job(ctx: CliContext) -> dict[str, Any]:
        geoip = GeoIP(ctx.settings.geoip)
        geoip.open()
        try:
            if address is not None:
                subject = normalize_ip(address) or address
                async with ctx.audited("ip.lookup", subject):
                    return await ipreport.lookup(
                        ctx.storage,
                        geoip,
                        ctx.settings.fraud,
                        address,
                        date=ipreport.parse_date(date),
                        include_blocked=False,
                    )
            day = ipreport.parse_date(date)
            async with ctx.audited("ip.top", f"top:{kind}:{day or ipreport.today()}"):
                return await ipreport.top(
                    ctx.storage,
                    geoip,
                    ctx.settings.fraud,
                    date=day,
                    kind="ip" if kind == "ip" else "network",
                    limit=top_n or 20,
                )
        finally:
            geoip.close()

    report = run_with_storage(settings, job)
    if fmt == "json":
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        rows, columns = (report["days"], DAY_COLUMNS) if address else (report["items"], TOP_COLUMNS)
        click.echo(to_csv(rows, columns), nl=False)
    elif address:
        click.echo(ipreport.render_lookup(report))
    else:
        click.echo(ipreport.render_top(report))


@main.command("stats")
@with_settings
@click.option("--from", "date_from", help="First day YYYY-MM-DD (default: 29 days before --to).")
@click.option("--to", "date_to", help="Last day YYYY-MM-DD (default: today, UTC).")
@click.option(
    "--by",
    type=click.Choice([*DIMENSIONS, "day"]),
    default="page",
    show_default=True,
    help="Dimension to rank, or 'day' for the daily series.",
)
@click.option("--where", "where", help="One filter DIM=VALUE, e.g. country=KZ.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table")
def stats_command(
    settings: Settings,
    date_from: str | None,
    date_to: str | None,
    by: str,
    where: str | None,
    limit: int,
    fmt: str,
) -> None:
    """Aggregated statistics from the rollups (small groups suppressed, as in the API)."""
    from collector import stats
    from collector.api.stats import table, to_csv

    params = {"from": date_from or "", "to": date_to or "", "limit": str(limit)}
    if by != "day":
        params["by"] = by
    if where:
        name, _, value = where.partition("=")
        params[name.strip()] = value
        if name.strip() not in stats.FILTERS:
            _fail(InputError(f"--where: filter one of {', '.join(stats.FILTERS)}"))
    k = settings.stats.min_visitors

    async def job(ctx: CliContext) -> tuple[str, dict[str, Any]]:
        query = stats.parse_query(params)
        kind = "timeseries" if by == "day" else "breakdown"
        async with ctx.audited(f"stats.{kind}", detail={"query": query.echo()}):
            if kind == "timeseries":
                return kind, await stats.timeseries(ctx.storage, query, k)
            return kind, await stats.breakdown(ctx.storage, query, k)

    kind, body = run_with_storage(settings, job)
    header, rows = table(kind, body)
    if fmt == "csv":
        click.echo(to_csv(header, rows), nl=False)
        return
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in cells:
        click.echo(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    q = body["query"]
    click.echo(f"{q['from']} .. {q['to']}, groups under k={body['k']} visitors merged into other")


def _when(ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts_ms / 1000))


@main.group()
def consent() -> None:
    """Proof of consent: the stored consent records."""


# Consent ids are URL-safe base64, so one in 64 begins with "-": without this Click reads
# such an id as an unknown option and the DPO gets a usage error instead of the records.
@consent.command("show", context_settings={"ignore_unknown_options": True})
@with_settings
@click.argument("consent_id")
@click.option("--ip", help="Also say whether the decisions were made from this IP address.")
def consent_show(settings: Settings, consent_id: str, ip: str | None) -> None:
    """Print, as JSON, every decision linked to CONSENT_ID (oldest first).

    The chain includes the decisions this one replaced and those that replaced it. The
    lookup is itself recorded in the audit trail (5.5).
    """
    import json

    from collector.consent import ConsentCodec
    from collector.consent_records import ConsentRecords
    from collector.errors import NotFound

    async def job(ctx: CliContext) -> list[dict[str, Any]]:
        c = ctx.settings.consent
        pepper = c.ip_pepper.encode() or ConsentCodec(c).derive_key("consent-ip-hash")
        records = ConsentRecords(ctx.storage, pepper)
        async with ctx.audited("consent.read", consent_id):
            chain = await records.chain(consent_id)
            if not chain:
                raise NotFound(f"no consent record for {consent_id!r}")
        if ip:
            from collector.enrich import normalize_ip

            # Hashed in the form the server resolved it (e.g. IPv4-mapped IPv6 unwrapped).
            digest = records.ip_hash(normalize_ip(ip) or ip)
            for record in chain:
                record["from_ip"] = record["ip_hash"] == digest
        return chain

    click.echo(json.dumps(run_with_storage(settings, job), indent=2, ensure_ascii=False))


@main.command("check-config")
@with_settings
def check_config(settings: Settings) -> None:
    """Validate the configuration and print the effective settings (secrets redacted)."""
    import json

    from collector.logs import redact

    click.echo(json.dumps(redact(settings), indent=2, default=str))


# Governance commands (block, erase, purge, backup, ...) live in their own module and
# register themselves on ``main`` when imported.
from collector import cli_governance  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    main()
