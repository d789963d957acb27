-- Retention of proofs of consent (5.1, 5.5). A consent record is still never edited (the
-- UPDATE trigger of 0003 stays); it may now be deleted only by the retention purge, and
-- only once it is older than the cutoff of a purge registered here first. The register is
-- itself append-only, so every purge leaves a permanent trace in the database besides its
-- audit record, and the database clock stamps it (a purge cannot reach into the future).
CREATE TABLE consent_record_purges (
    id        INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL
              DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    cutoff_ms INTEGER NOT NULL,     -- records decided before this may be deleted
    days      INTEGER NOT NULL,     -- the retention period it applied
    pending   INTEGER NOT NULL,     -- records older than the cutoff when it started
    actor     TEXT    NOT NULL,
    CHECK (cutoff_ms < at_ms)
);
CREATE TRIGGER consent_record_purges_no_update BEFORE UPDATE ON consent_record_purges
BEGIN
    SELECT RAISE(ABORT, 'the consent record purge register is append-only');
END;
CREATE TRIGGER consent_record_purges_no_delete BEFORE DELETE ON consent_record_purges
BEGIN
    SELECT RAISE(ABORT, 'the consent record purge register is append-only');
END;
CREATE TRIGGER consent_records_retention_only BEFORE DELETE ON consent_records
WHEN OLD.decided_at_ms >= coalesce((SELECT max(cutoff_ms) FROM consent_record_purges), -1)
BEGIN
    SELECT RAISE(ABORT, 'consent records are deleted only by the retention purge, once expired');
END;
