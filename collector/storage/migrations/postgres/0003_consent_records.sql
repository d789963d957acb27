-- Proof of consent (2.1, 4.1.10, 4.1.11, 5.1, 9.1-9.2): one row per decision, never changed.
-- See the SQLite migration of the same number for the column meanings.
CREATE TABLE consent_records (
    id                BIGSERIAL PRIMARY KEY,
    consent_id        TEXT     NOT NULL UNIQUE,
    previous_id       TEXT,
    action            TEXT     NOT NULL CHECK (action IN ('grant', 'refuse', 'withdraw')),
    statistics        SMALLINT NOT NULL CHECK (statistics IN (0, 1)),
    advertising       SMALLINT NOT NULL CHECK (advertising IN (0, 1)),
    policy_version    TEXT     NOT NULL,
    decided_at_ms     BIGINT   NOT NULL,
    source            TEXT     NOT NULL,
    origin            TEXT,
    user_agent_family TEXT     NOT NULL,
    ip_hash           TEXT     NOT NULL,
    gpc               SMALLINT NOT NULL CHECK (gpc IN (0, 1))
);
CREATE INDEX consent_records_previous ON consent_records (previous_id);
CREATE INDEX consent_records_time ON consent_records (decided_at_ms);

CREATE FUNCTION consent_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consent records are append-only';
END;
$$;
CREATE TRIGGER consent_records_append_only BEFORE UPDATE ON consent_records
    FOR EACH ROW EXECUTE FUNCTION consent_records_append_only();
