-- Blocking (6.2.4), extended: IP networks besides exact visitor ids and addresses, and an
-- optional end (expires_at) after which a block stops applying by itself, "for the period
-- of the check". SQLite cannot alter a CHECK constraint: the table is rebuilt, ids kept.
CREATE TABLE blocks_0010 (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL CHECK (kind IN ('visitor', 'ip', 'network')),
    value       TEXT    NOT NULL,   -- visitor id, canonical IP, or normalised CIDR network
    reason      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,   -- unix ms
    created_by  TEXT    NOT NULL,
    released_at INTEGER,            -- set on release, or to expires_at once it has passed
    released_by TEXT,
    expires_at  INTEGER             -- unix ms; NULL: until released
);
INSERT INTO blocks_0010 (id, kind, value, reason, created_at, created_by, released_at, released_by)
    SELECT id, kind, value, reason, created_at, created_by, released_at, released_by FROM blocks;
DROP TABLE blocks;
ALTER TABLE blocks_0010 RENAME TO blocks;
CREATE INDEX blocks_active ON blocks (kind, value) WHERE released_at IS NULL;

-- The stored addresses inside an active network block: collector.visibility.VISIBLE hides
-- a hit by exact match on them (portable SQL; SQLite has no inet type). New hits from
-- the network never get stored (the writer filter); release and expiry delete the rows.
CREATE TABLE block_ips (
    block_id INTEGER NOT NULL REFERENCES blocks (id),
    ip       TEXT    NOT NULL,
    PRIMARY KEY (block_id, ip)
);
CREATE INDEX block_ips_ip ON block_ips (ip);

-- The blocks in force now: not released, not past their end. Read by VISIBLE, so an
-- expired block stops hiding data at once, whether or not a server has noticed yet.
CREATE VIEW active_blocks AS
    SELECT * FROM blocks
    WHERE released_at IS NULL
      AND (expires_at IS NULL
           OR expires_at > CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
