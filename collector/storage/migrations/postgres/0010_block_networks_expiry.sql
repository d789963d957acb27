-- Blocking (6.2.4), extended: IP networks besides exact visitor ids and addresses, and an
-- optional end (expires_at) after which a block stops applying by itself, "for the period
-- of the check".
ALTER TABLE blocks DROP CONSTRAINT blocks_kind_check;
ALTER TABLE blocks ADD CONSTRAINT blocks_kind_check
    CHECK (kind IN ('visitor', 'ip', 'network'));
ALTER TABLE blocks ADD COLUMN expires_at BIGINT;   -- unix ms; NULL: until released

-- The stored addresses inside an active network block: collector.visibility.VISIBLE hides
-- a hit by exact match on them (the same SQL as on SQLite, which has no inet type). New
-- hits from the network never get stored (the writer filter); release and expiry delete
-- the rows.
CREATE TABLE block_ips (
    block_id BIGINT NOT NULL REFERENCES blocks (id),
    ip       TEXT   NOT NULL,
    PRIMARY KEY (block_id, ip)
);
CREATE INDEX block_ips_ip ON block_ips (ip);

-- The blocks in force now: not released, not past their end. Read by VISIBLE, so an
-- expired block stops hiding data at once, whether or not a server has noticed yet.
CREATE VIEW active_blocks AS
    SELECT * FROM blocks
    WHERE released_at IS NULL
      AND (expires_at IS NULL
           OR expires_at > (extract(epoch FROM statement_timestamp()) * 1000)::bigint);
