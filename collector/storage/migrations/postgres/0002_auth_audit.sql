-- API tokens (stored hashed) and the hash-chained audit trail (clause 5.5).
CREATE TABLE api_tokens (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    role        TEXT    NOT NULL CHECK (role IN ('analyst', 'engineer', 'admin')),
    token_hash  TEXT    NOT NULL UNIQUE,   -- SHA-256 of the token; the token itself is shown once
    prefix      TEXT    NOT NULL,          -- first characters, to recognise a token in listings
    created_at  BIGINT  NOT NULL,          -- unix ms
    revoked_at  BIGINT
);

-- Appends are serialised across nodes by the advisory lock PostgresStorage.transaction()
-- takes, so the chain stays one chain when several collectors record at once.
CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    ts_ms       BIGINT  NOT NULL,
    actor       TEXT    NOT NULL,          -- token name, cli:<user>, or system
    role        TEXT,
    action      TEXT    NOT NULL,          -- e.g. ip.lookup, token.create, block.add
    subject     TEXT,                      -- what personal data was touched (an IP, a visitor id)
    request_id  TEXT,
    outcome     TEXT    NOT NULL,          -- ok, denied, error, or an HTTP status
    detail      TEXT,                      -- JSON, secrets never included
    prev_hash   TEXT    NOT NULL,
    hash        TEXT    NOT NULL
);
CREATE INDEX audit_log_ts ON audit_log (ts_ms);
