-- Proof of consent (2.1, 4.1.10, 4.1.11, 5.1, 9.1-9.2): one row per decision, never changed.
-- Every decision gets a fresh consent id; previous_id links it to the decision it replaced
-- (same browser), so an auditor can follow a browser's history while each hit's consent_id
-- names exactly the record it was recorded under.
CREATE TABLE consent_records (
    id                INTEGER PRIMARY KEY,
    consent_id        TEXT    NOT NULL UNIQUE,
    previous_id       TEXT,                 -- the consent this decision replaced, if any
    action            TEXT    NOT NULL CHECK (action IN ('grant', 'refuse', 'withdraw')),
    statistics        INTEGER NOT NULL CHECK (statistics IN (0, 1)),
    advertising       INTEGER NOT NULL CHECK (advertising IN (0, 1)),
    policy_version    TEXT    NOT NULL,     -- 9.1-9.2
    decided_at_ms     INTEGER NOT NULL,     -- UTC milliseconds
    source            TEXT    NOT NULL,     -- post-json, post-form, delete
    origin            TEXT,                 -- the store page's Origin header
    user_agent_family TEXT    NOT NULL,     -- e.g. "Chrome Mobile"; never the raw user agent
    ip_hash           TEXT    NOT NULL,     -- HMAC-SHA256(pepper, IP), hex; never the raw IP
    gpc               INTEGER NOT NULL CHECK (gpc IN (0, 1))  -- Sec-GPC / honoured DNT was sent
);
CREATE INDEX consent_records_previous ON consent_records (previous_id);
CREATE INDEX consent_records_time ON consent_records (decided_at_ms);

-- Append-only: a record is evidence, so it is never edited. (Deleting stays possible for a
-- future retention or erasure job, which must itself be audited.)
CREATE TRIGGER consent_records_append_only BEFORE UPDATE ON consent_records
BEGIN
    SELECT RAISE(ABORT, 'consent records are append-only');
END;
