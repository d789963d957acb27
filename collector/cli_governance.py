"""CLI commands for personal-data governance; each one is audited (5.5).

block / unblock / blocks (6.2.4; they also release, audited, the blocks whose end has
passed, as a running server does), export / erase (subject requests), purge (5.1),
incident (5.4), backup / restore (5.5). Thin wrappers over the library functions.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from collector.cli import CliContext, main, run_with_storage, with_settings
from collector.config import Settings
from collector.errors import CollectorError, InputError


def _subject_options(func: Any) -> Any:
    func = click.option("--ip", help="An IP address.")(func)
    return click.option("--visitor", help="A visitor id (the kdv_vid cookie).")(func)


def _when(ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts_ms / 1000))


def _ip_hash(settings: Settings) -> Callable[[str], str]:
    """The consent records' keyed IP hash, as the server computes it."""
    from collector.config import resolve_secret
    from collector.consent import ConsentCodec
    from collector.consent_records import ConsentRecords

    settings = resolve_secret(settings)
    consent = settings.consent
    pepper = consent.ip_pepper.encode() or ConsentCodec(consent).derive_key("consent-ip-hash")
    return ConsentRecords(None, pepper).ip_hash  # type: ignore[arg-type]  # hashing only


def _subject(visitor: str | None, ip: str | None) -> Any:
    from collector.subjects import Subject

    try:
        return Subject.parse(visitor, ip)
    except InputError as exc:
        raise click.UsageError(exc.detail) from None


def _target(visitor: str | None, ip: str | None, network: str | None, force: bool) -> Any:
    from collector.blocking import Target

    try:
        return Target.parse(visitor, ip, network, force=force)
    except InputError as exc:
        raise click.UsageError(exc.detail) from None


async def _expire_due(ctx: CliContext, settings: Settings) -> None:
    """Release (audited) the blocks whose end has passed, as a server would."""
    from collector import aggregates, blocking

    await blocking.expire_due(ctx.storage, aggregates.rebuilders(settings), ctx.audit)


@main.command()
@with_settings
@_subject_options
@click.option("--network", help="An IP network in CIDR form (203.0.113.0/24, 2001:db8::/48).")
@click.option("--force", is_flag=True, help="Allow a network wider than /16 (IPv4), /32 (IPv6).")
@click.option("--reason", required=True, help="The request or the check the block is for.")
@click.option("--for", "duration", help="End the block after this long: 30d, 12h, 90m, 2w.")
@click.option("--until", help="End the block at this time (ISO 8601, UTC unless offset).")
def block(
    settings: Settings,
    visitor: str | None,
    ip: str | None,
    network: str | None,
    force: bool,
    reason: str,
    duration: str | None,
    until: str | None,
) -> None:
    """Block a subject (6.2.4): new hits are not recorded, old ones are hidden."""
    from collector import aggregates, blocking

    target = _target(visitor, ip, network, force)
    try:
        expires_at = blocking.parse_expiry(until, duration)
    except InputError as exc:
        raise click.UsageError(exc.detail.replace("expires_at", "--until")) from None
    rebuild = aggregates.rebuilders(settings)

    async def job(ctx: CliContext) -> dict[str, Any]:
        await _expire_due(ctx, settings)
        since = int(time.time() * 1000)
        detail: dict[str, Any] = {"kind": target.kind, "reason": reason}
        if expires_at is not None:
            detail["expires_at"] = expires_at
        if force:
            detail["force"] = True
        async with ctx.audited("block.add", target.value, detail):
            row = await blocking.add(
                ctx.storage, target, reason, ctx.actor, rebuild, expires_at=expires_at
            )
        # Running servers refresh their block list within 0.25 s; then make rollups exact.
        await blocking.settle(ctx.storage, target, since, 1.0, rebuild, int(row["id"]))
        return row

    row = run_with_storage(settings, job)
    until_text = f" until {_when(row['expires_at'])} UTC" if row["expires_at"] else ""
    click.echo(f"blocked {target.kind} {target.value} (block {row['id']}){until_text}")


@main.command()
@with_settings
@_subject_options
@click.option("--network", help="An IP network in CIDR form.")
@click.option("--id", "block_id", type=int, help="The block id (see `collector blocks`).")
def unblock(
    settings: Settings,
    visitor: str | None,
    ip: str | None,
    network: str | None,
    block_id: int | None,
) -> None:
    """Release a block: the subject's data counts again and new hits are recorded."""
    from collector import aggregates, blocking

    named = visitor or ip or network
    target = None if block_id is not None and not named else _target(visitor, ip, network, True)
    rebuild = aggregates.rebuilders(settings)

    async def job(ctx: CliContext) -> dict[str, Any]:
        await _expire_due(ctx, settings)
        target_id = block_id
        if target is not None:
            target_id = await blocking.find_active(ctx.storage, target)
        assert target_id is not None
        async with ctx.audited("block.release", target.value if target else None):
            return await blocking.release(ctx.storage, target_id, ctx.actor, rebuild)

    row = run_with_storage(settings, job)
    click.echo(f"unblocked {row['kind']} {row['value']} (block {row['id']})")


@main.command("blocks")
@with_settings
@click.option("--all", "everything", is_flag=True, help="Include released and expired blocks.")
def blocks(settings: Settings, everything: bool) -> None:
    """List blocks, newest first: those in force, or all of them with their state."""
    from collector import blocking

    async def job(ctx: CliContext) -> list[dict[str, Any]]:
        await _expire_due(ctx, settings)
        return await blocking.listing(ctx.storage, active_only=not everything)

    for r in run_with_storage(settings, job):
        if r["state"] == "expired":
            state = f"expired {_when(r['expires_at'])}"
        elif r["state"] == "released":
            state = f"released {_when(r['released_at'])}"
        elif r["expires_at"]:
            state = f"active until {_when(r['expires_at'])}"
        else:
            state = "active"
        click.echo(
            f"{r['id']:>5} {r['kind']:<7} {r['value']:<34} {_when(r['created_at'])} "
            f"{r['created_by']:<16} {state}  {r['reason']}"
        )


@main.command()
@with_settings
@_subject_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="File (default stdout).")
def export(settings: Settings, visitor: str | None, ip: str | None, output: str | None) -> None:
    """Export everything held about a subject as JSON (a subject access request)."""
    from collector import subjects

    subject = _subject(visitor, ip)

    async def job(ctx: CliContext) -> dict[str, Any]:
        async with ctx.audited("subject.export", subject.value, {"kind": subject.kind}):
            return await subjects.export(ctx.storage, subject, _ip_hash(settings))

    text = json.dumps(run_with_storage(settings, job), indent=2, ensure_ascii=False)
    if output:
        from collector.storage.sqlite import create_private_file

        create_private_file(Path(output))  # personal data: 0600 like the database
        Path(output).write_text(text + "\n", encoding="utf-8")
    else:
        click.echo(text)


@main.command()
@with_settings
@_subject_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def erase(settings: Settings, visitor: str | None, ip: str | None, yes: bool) -> None:
    """Erase a subject: hits and per-IP rows deleted, consent records pseudonymised."""
    from collector import aggregates, subjects
    from collector.config import resolve_secret

    subject = _subject(visitor, ip)
    if not yes:
        click.confirm(f"Erase all data of {subject.kind} {subject.value}?", abort=True)
    settings = resolve_secret(settings)

    async def job(ctx: CliContext) -> subjects.Erased:
        async with ctx.audited("subject.erase", subject.value, {"kind": subject.kind}):
            done = await subjects.erase(
                ctx.storage,
                subject,
                settings.consent.secret,
                aggregates.rebuilders(settings),
                _ip_hash(settings),
            )
        await ctx.audit.record(
            actor=ctx.actor,
            action="subject.erase.result",
            subject=subject.value,
            detail=done.as_dict(),
        )
        return done

    done = run_with_storage(settings, job)
    click.echo(
        f"erased {done.hits} hits; {done.consent_records} consent records kept (pseudonymous)"
        + "".join(f"; {n} rows from {t}" for t, n in done.tables.items())
    )


@main.command()
@with_settings
@click.option("--days", type=click.IntRange(1), help="Override retention.days for this run.")
@click.option("--dry-run", is_flag=True, help="Only say what would be purged.")
def purge(settings: Settings, days: int | None, dry_run: bool) -> None:
    """Apply retention (5.1) now: delete or depersonalise hits older than the period, and
    delete proofs of consent older than consent.records_retention_days."""
    from collector import retention

    async def job(ctx: CliContext) -> tuple[retention.Plan, int]:
        plan = await retention.plan(ctx.storage, settings, days=days)
        if dry_run or not plan.pending:
            return plan, 0
        async with ctx.audited("retention.run", None, plan.as_dict()):
            with click.progressbar(
                length=plan.pending, label=f"{plan.mode} hits", file=sys.stderr
            ) as bar:
                done = await retention.purge(
                    ctx.storage, plan, settings.retention.chunk_size, bar.update
                )
        await ctx.audit.record(
            actor=ctx.actor, action="retention.result", detail={**plan.as_dict(), "rows": done}
        )
        return plan, done

    plan, done = run_with_storage(settings, job)
    verb = "would " + plan.mode if dry_run else plan.mode.rstrip("e") + "ed"
    count = plan.pending if dry_run else done
    click.echo(f"{verb} {count} hits older than {plan.days} days (before {_when(plan.cutoff_ms)})")
    cplan, cdone = run_with_storage(settings, _consent_purge(settings, dry_run))
    click.echo(
        f"{'would delete' if dry_run else 'deleted'} {cplan.pending if dry_run else cdone} "
        f"consent records older than {cplan.days} days (before {_when(cplan.cutoff_ms)})"
    )


def _consent_purge(settings: Settings, dry_run: bool) -> Callable[[CliContext], Any]:
    """The proofs-of-consent half of ``collector purge`` (their own period; audited)."""
    from collector import retention

    async def job(ctx: CliContext) -> tuple[retention.ConsentPlan, int]:
        plan = await retention.consent_records_plan(ctx.storage, settings)
        if dry_run or not plan.pending:
            return plan, 0
        detail: dict[str, Any] = plan.as_dict()
        async with ctx.audited("consent_records.purge", None, detail):
            done = await retention.purge_consent_records(
                ctx.storage, plan, settings.retention.chunk_size, ctx.actor
            )
            detail["rows"] = done
        return plan, done

    return job


@main.command()
@with_settings
@click.option("--from", "start", required=True, help="Start of the affected window (ISO, UTC).")
@click.option("--to", "end", required=True, help="End of the window, exclusive (ISO, UTC).")
@click.option("--ip-range", help="Only hits from this network (CIDR).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def incident(settings: Settings, start: str, end: str, ip_range: str | None, fmt: str) -> None:
    """Breach report (5.4): the subjects whose data lay in the affected range."""
    from collector import incident as report

    async def job(ctx: CliContext) -> dict[str, Any]:
        frm, to = report.parse_time(start, "--from"), report.parse_time(end, "--to")
        net = report.parse_network(ip_range)
        detail = {"from": start, "to": end, "ip_range": ip_range}
        async with ctx.audited("incident.report", ip_range, detail):
            return await report.affected(ctx.storage, frm, to, net)

    found = run_with_storage(settings, job)
    if fmt == "json":
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'VISITOR':<34} {'HITS':>6} {'FIRST':<19} {'LAST':<19} CONSENT IDS / IPS")
    for s in found["subjects"]:
        click.echo(
            f"{s['visitor_id']:<34} {s['hits']:>6} {_when(s['first_ms'])} {_when(s['last_ms'])} "
            f"{','.join(s['consent_ids'])} / {','.join(s['ips'])}"
        )
    click.echo(f"{found['visitors']} visitors, {len(found['consent_ids'])} consent ids affected")


def _sqlite_only(settings: Settings) -> Path:
    if settings.storage.backend != "sqlite":
        raise InputError("backup/restore cover SQLite; for PostgreSQL use pg_dump or PITR")
    return Path(settings.storage.path)


@main.command()
@with_settings
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def backup(settings: Settings, file: str, force: bool) -> None:
    """Copy the database to FILE while the server runs (SQLite online backup, 0600)."""
    from collector import backup as copier

    db = _sqlite_only(settings)

    async def job(ctx: CliContext) -> copier.Copied:
        async with ctx.audited("backup.create", None, {"file": file}):
            done = await asyncio.to_thread(copier.backup, db, Path(file), force=force)
        return done

    done = run_with_storage(settings, job)
    click.echo(
        f"backed up {done.hits} hits ({done.bytes} bytes, schema {done.schema_version}) "
        f"to {done.path} in {done.seconds:.2f}s; integrity ok"
    )


@main.command()
@with_settings
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
def restore(settings: Settings, file: str) -> None:
    """Replace the database by backup FILE (stop the server first; the old file is kept)."""
    from collector import backup as copier

    db = _sqlite_only(settings)
    try:
        done = copier.restore(db, Path(file))
    except CollectorError as exc:
        refused = exc

        async def failed(ctx: CliContext) -> None:
            await ctx.audit.record(
                actor=ctx.actor,
                action="backup.restore",
                outcome="error",
                detail={"file": file, "error": refused.detail},
            )

        if db.exists():
            run_with_storage(settings, failed)
        click.echo(f"collector: {exc.detail}", err=True)
        sys.exit(exc.exit_code)

    async def job(ctx: CliContext) -> None:
        await ctx.audit.record(
            actor=ctx.actor, action="backup.restore", detail={"file": file, **done.as_dict()}
        )

    run_with_storage(settings, job)
    click.echo(
        f"restored {done.hits} hits from {file}"
        + (f"; the replaced database is kept as {done.replaced}" if done.replaced else "")
    )
