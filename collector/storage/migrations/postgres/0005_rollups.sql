-- Analyst rollups (issue 4; clauses 3.4, 6.2.2): see the SQLite twin for the design.
CREATE TABLE rollup_hits (
    fdim    TEXT    NOT NULL,
    fvalue  TEXT    NOT NULL,
    dim     TEXT    NOT NULL,
    grain   TEXT    NOT NULL CHECK (grain IN ('hour', 'day')),
    bucket  BIGINT  NOT NULL,
    value   TEXT    NOT NULL,
    hits    BIGINT  NOT NULL,
    vbits   BIGINT  NOT NULL,
    PRIMARY KEY (fdim, fvalue, dim, grain, bucket, value)
);
CREATE INDEX rollup_hits_bucket ON rollup_hits (grain, bucket);

CREATE TABLE rollup_hll (
    dim     TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    day     BIGINT  NOT NULL,
    reg     INTEGER NOT NULL,
    rho     INTEGER NOT NULL,
    PRIMARY KEY (dim, value, day, reg)
);
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
    month   BIGINT    NOT NULL,   -- first day of the month, unix ms
    value   TEXT    NOT NULL,
    hits    BIGINT    NOT NULL,
    vbits   BIGINT    NOT NULL,
    PRIMARY KEY (dim, month, value)
);

CREATE TABLE rollup_hll_month (
    dim     TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    month   BIGINT    NOT NULL,
    reg     INTEGER NOT NULL,
    rho     INTEGER NOT NULL,
    PRIMARY KEY (dim, value, month, reg)
);
