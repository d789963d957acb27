-- IP statistics (3.3.2 fraud control and troubleshooting, 4.1.4 location, 4.1.9 support).
-- Kept on write inside each batch transaction (collector/ipstats.py) from the hits the
-- writer keeps (blocked subjects are filtered out before, 6.2.4); rebuildable from the
-- visible hits with ipstats.rebuild.
-- Rows are per IP; its network (/24 IPv4, /48 IPv6, CIDR form) is stored beside it so
-- that network statistics are sums, maxima and distinct counts over the IP rows when
-- read, rather than a second set of rows written for every hit.
CREATE TABLE ipstat_daily (
    day             TEXT    NOT NULL,   -- UTC 'YYYY-MM-DD'
    ip              TEXT    NOT NULL,
    net             TEXT    NOT NULL,
    hits            BIGINT  NOT NULL,
    bot_hits        BIGINT  NOT NULL,
    no_page_hits    BIGINT  NOT NULL,
    first_ms        BIGINT  NOT NULL,
    last_ms         BIGINT  NOT NULL,
    PRIMARY KEY (day, ip)
);

-- Hits per IP and minute (minute = ts_ms / 60000, within the UTC day). The day's peak per
-- minute is their maximum (for a network: of their per-minute sums), taken when read:
-- keeping it on write cost an UPDATE per subject and minute on every batch.
CREATE TABLE ipstat_minute (
    day     TEXT    NOT NULL,
    ip      TEXT    NOT NULL,
    minute  BIGINT  NOT NULL,
    net     TEXT    NOT NULL,
    hits    BIGINT  NOT NULL,
    PRIMARY KEY (day, ip, minute)
);

-- Each distinct (IP, visitor id, user agent, country, bot family) of a day, once
-- (ON CONFLICT DO NOTHING, exact under concurrent writers). Distinct visitors, user
-- agents, countries and bot families per IP or network, and distinct IPs and countries
-- per visitor id (the many-IPs and country-hopping rules), are counted from it when read.
-- One row per combination instead of one per (subject, kind, value): a returning visitor
-- adds nothing, a new one usually one row. ua is a SHA-256 prefix of the user agent,
-- never the string; country and botfamily are '' when unknown / not a bot.
-- Personal data: same retention as hits; erasure deletes them.
CREATE TABLE ipstat_values (
    day       TEXT NOT NULL,
    ip        TEXT NOT NULL,
    visitor   TEXT NOT NULL,
    ua        TEXT NOT NULL,
    country   TEXT NOT NULL,
    botfamily TEXT NOT NULL,
    net       TEXT NOT NULL,
    PRIMARY KEY (day, ip, visitor, ua, country, botfamily)
);
-- A visitor id's rows: its IPs and countries of a day, and erasure.
CREATE INDEX ipstat_values_visitor ON ipstat_values (visitor, day);

-- Security counters for requests WITHOUT statistics consent ([ipstats] without_consent,
-- off by default): IP, counts and times only; no user agent, cookie or URL. Kept apart
-- so they never reach analyst views and are purged after without_consent_days.
-- Not rebuildable: there are no raw rows behind them.
CREATE TABLE ipstat_unconsented (
    day             TEXT    NOT NULL,
    ip              TEXT    NOT NULL,
    hits            BIGINT  NOT NULL,
    bot_hits        BIGINT  NOT NULL,   -- bots other than known crawlers
    crawler_hits    BIGINT  NOT NULL,   -- known search-engine / preview crawlers
    first_ms        BIGINT  NOT NULL,
    last_ms         BIGINT  NOT NULL,
    peak_per_minute BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (day, ip)
);

CREATE TABLE ipstat_unconsented_minute (
    ip      TEXT    NOT NULL,
    minute  BIGINT  NOT NULL,
    hits    BIGINT  NOT NULL,
    PRIMARY KEY (ip, minute)
);
CREATE INDEX ipstat_unconsented_minute_minute ON ipstat_unconsented_minute (minute);
