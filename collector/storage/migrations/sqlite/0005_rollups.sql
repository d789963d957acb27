-- Analyst rollups (issue 4; clauses 3.4, 6.2.2): counts and visitor sketches only, no
-- IP, visitor id or user agent. Kept on write by collector/rollups.py.
--
-- rollup_hits: hits per time bucket and dimension value. fdim/fvalue = '' is the plain
-- (one-dimensional) rollup, per day (and per hour for total and the small dimensions);
-- fdim = placement, country, device_class or source holds the same counts restricted to
-- one value of that filter (per day). vbits is a 63-bit linear-counting bitmap of hashed visitor ids: OR-merged
-- across buckets, its popcount is a lower bound of distinct visitors (suppression, k).
CREATE TABLE rollup_hits (
    fdim    TEXT    NOT NULL,
    fvalue  TEXT    NOT NULL,
    dim     TEXT    NOT NULL,   -- total, page, referrer, placement, browser, os, device_class, country, source
    grain   TEXT    NOT NULL CHECK (grain IN ('hour', 'day')),
    bucket  INTEGER NOT NULL,   -- start of the hour or UTC day, unix ms
    value   TEXT    NOT NULL,
    hits    INTEGER NOT NULL,
    vbits   INTEGER NOT NULL,
    PRIMARY KEY (fdim, fvalue, dim, grain, bucket, value)
) WITHOUT ROWID;
CREATE INDEX rollup_hits_bucket ON rollup_hits (grain, bucket);

-- rollup_hll: HyperLogLog registers (p = 9, 512 per sketch, stored sparse: one row per
-- touched register) of hashed visitor ids per UTC day and one-dimensional value.
-- Merging days is MAX(rho) per register.
CREATE TABLE rollup_hll (
    dim     TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    day     INTEGER NOT NULL,   -- start of the UTC day, unix ms
    reg     INTEGER NOT NULL,
    rho     INTEGER NOT NULL,
    PRIMARY KEY (dim, value, day, reg)
) WITHOUT ROWID;
CREATE INDEX rollup_hll_day ON rollup_hll (day);

-- Raw hits before raw_floor_ms have been purged by retention (rollups.mark_purged): a
-- rebuild never recomputes those days, since the rollups are their only record now.
CREATE TABLE rollup_state (
    name    TEXT    PRIMARY KEY,
    value   BIGINT  NOT NULL
);

-- Per calendar month (UTC), one-dimensional only: the merge of the month's day rows
-- (hits summed, vbits OR-ed, registers MAX-ed), kept on write like the rest so a year
-- is read as 12 month rows plus the days at the edges. rebuild() re-derives them.
CREATE TABLE rollup_month (
    dim     TEXT    NOT NULL,
    month   INTEGER    NOT NULL,   -- first day of the month, unix ms
    value   TEXT    NOT NULL,
    hits    INTEGER    NOT NULL,
    vbits   INTEGER    NOT NULL,
    PRIMARY KEY (dim, month, value)
) WITHOUT ROWID;

CREATE TABLE rollup_hll_month (
    dim     TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    month   INTEGER    NOT NULL,
    reg     INTEGER NOT NULL,
    rho     INTEGER NOT NULL,
    PRIMARY KEY (dim, value, month, reg)
) WITHOUT ROWID;
