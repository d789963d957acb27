-- IP statistics (3.3.2 fraud control and troubleshooting, 4.1.4 location, 4.1.9 support).
-- Kept on write inside each batch transaction (collector/ipstats.py) from visible hits
-- only (blocked subjects excluded, 6.2.4); rebuildable from hits with ipstats.rebuild.
-- scope: 'ip' (one address) or 'net' (its /24 IPv4 or /48 IPv6 network).
CREATE TABLE ipstat_daily (
    day             TEXT    NOT NULL,   -- UTC 'YYYY-MM-DD'
    scope           TEXT    NOT NULL CHECK (scope IN ('ip', 'net')),
    subject         TEXT    NOT NULL,   -- the IP or the network in CIDR form
    hits            INTEGER NOT NULL,
    bot_hits        INTEGER NOT NULL,
    no_page_hits    INTEGER NOT NULL,
    first_ms        INTEGER NOT NULL,
    last_ms         INTEGER NOT NULL,
    peak_per_minute INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, scope, subject)
) WITHOUT ROWID;

-- Distinct values per (day, scope, subject), for exact distinct counts under concurrent
-- writers (ON CONFLICT DO NOTHING). Personal data: same retention as hits; erasure
-- deletes them. scope 'visitor' (subject = visitor id) holds the IPs and countries of
-- one visitor id, for the many-IPs and country-hopping rules.
-- kind: visitor, ua (SHA-256 prefix of the user agent, never the string), country,
-- ip (net scope and visitor scope), botfamily (user-agent family of bot hits).
CREATE TABLE ipstat_values (
    day     TEXT NOT NULL,
    scope   TEXT NOT NULL CHECK (scope IN ('ip', 'net', 'visitor')),
    subject TEXT NOT NULL,
    kind    TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (day, scope, subject, kind, value)
) WITHOUT ROWID;
CREATE INDEX ipstat_values_value ON ipstat_values (kind, value);

-- Hits per subject and minute (minute = ts_ms / 60000); the daily peak is their maximum.
CREATE TABLE ipstat_minute (
    scope   TEXT    NOT NULL,
    subject TEXT    NOT NULL,
    minute  INTEGER NOT NULL,
    hits    INTEGER NOT NULL,
    PRIMARY KEY (scope, subject, minute)
) WITHOUT ROWID;
CREATE INDEX ipstat_minute_minute ON ipstat_minute (minute);

-- Security counters for requests WITHOUT statistics consent ([ipstats] without_consent,
-- off by default): IP, counts and times only; no user agent, cookie or URL. Kept apart
-- so they never reach analyst views and are purged after without_consent_days.
-- Not rebuildable: there are no raw rows behind them.
CREATE TABLE ipstat_unconsented (
    day             TEXT    NOT NULL,
    ip              TEXT    NOT NULL,
    hits            INTEGER NOT NULL,
    bot_hits        INTEGER NOT NULL,   -- bots other than known crawlers
    crawler_hits    INTEGER NOT NULL,   -- known search-engine / preview crawlers
    first_ms        INTEGER NOT NULL,
    last_ms         INTEGER NOT NULL,
    peak_per_minute INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, ip)
) WITHOUT ROWID;

CREATE TABLE ipstat_unconsented_minute (
    ip      TEXT    NOT NULL,
    minute  INTEGER NOT NULL,
    hits    INTEGER NOT NULL,
    PRIMARY KEY (ip, minute)
) WITHOUT ROWID;
CREATE INDEX ipstat_unconsented_minute_minute ON ipstat_unconsented_minute (minute);
