-- Core: consented hits (clause 3.3) and the anonymous per-page consent counters.
-- hits is partitioned by UTC day on ts_ms so that retention (5.1) drops whole partitions
-- instead of deleting rows; PostgresStorage creates the daily partitions (hits_pYYYYMMDD)
-- ahead of time and on demand. The primary key must contain the partition key.
CREATE TABLE hits (
    id              BIGSERIAL,
    ts_ms           BIGINT  NOT NULL,   -- 3.3.4 access time, UTC milliseconds
    ip              TEXT    NOT NULL,   -- 3.3.1
    visitor_id      TEXT    NOT NULL,   -- 3.3.2 our first-party cookie
    session_id      TEXT    NOT NULL,
    cookies         TEXT,               -- allowlisted cookie values, JSON
    user_agent      TEXT    NOT NULL,   -- 3.3.3
    browser_family  TEXT    NOT NULL,
    browser_version TEXT    NOT NULL,
    os_family       TEXT    NOT NULL,
    os_version      TEXT    NOT NULL,
    device_family   TEXT    NOT NULL,
    device_brand    TEXT    NOT NULL,
    device_class    TEXT    NOT NULL,
    page_url        TEXT,               -- 3.3.5
    referrer_url    TEXT,               -- 3.3.6
    placement_id    TEXT,
    country         TEXT,
    region          TEXT,
    city            TEXT,
    consent_id      TEXT    NOT NULL,
    policy_version  TEXT    NOT NULL,
    source          TEXT    NOT NULL DEFAULT 'web',
    PRIMARY KEY (ts_ms, id)
) PARTITION BY RANGE (ts_ms);
CREATE INDEX hits_ip ON hits (ip, ts_ms);
CREATE INDEX hits_visitor ON hits (visitor_id, ts_ms);
CREATE INDEX hits_id ON hits (id);

CREATE TABLE pixel_counts (
    day     TEXT    NOT NULL,
    path    TEXT    NOT NULL,
    consent TEXT    NOT NULL,   -- granted, refused, absent, invalid
    hits    BIGINT  NOT NULL,
    PRIMARY KEY (day, path, consent)
);
