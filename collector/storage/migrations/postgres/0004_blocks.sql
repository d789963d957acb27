-- Blocking (6.2.4): a subject's data is blocked from the moment of the request for the
-- period of the check. Active blocks have released_at NULL; released ones stay as history.
CREATE TABLE blocks (
    id          BIGSERIAL PRIMARY KEY,
    kind        TEXT    NOT NULL CHECK (kind IN ('visitor', 'ip')),
    value       TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,   -- unix ms
    created_by  TEXT    NOT NULL,
    released_at BIGINT,
    released_by TEXT
);
CREATE INDEX blocks_active ON blocks (kind, value) WHERE released_at IS NULL;
