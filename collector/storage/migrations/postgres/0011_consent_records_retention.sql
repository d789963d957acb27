-- Retention of proofs of consent (5.1, 5.5). A consent record is still never edited (the
-- UPDATE trigger of 0003 stays); it may now be deleted only by the retention purge, and
-- only once it is older than the cutoff of a purge registered here first. The register is
-- itself append-only, so every purge leaves a permanent trace in the database besides its
-- audit record, and the database clock stamps it (a purge cannot reach into the future).
CREATE TABLE consent_record_purges (
    id        BIGSERIAL PRIMARY KEY,
    at_ms     BIGINT  NOT NULL
              DEFAULT ((extract(epoch FROM statement_timestamp()) * 1000)::bigint),
    cutoff_ms BIGINT  NOT NULL,     -- records decided before this may be deleted
    days      INTEGER NOT NULL,     -- the retention period it applied
    pending   BIGINT  NOT NULL,     -- records older than the cutoff when it started
    actor     TEXT    NOT NULL,
    CHECK (cutoff_ms < at_ms)
);
CREATE FUNCTION consent_record_purges_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the consent record purge register is append-only';
END;
$$;
CREATE TRIGGER consent_record_purges_append_only BEFORE UPDATE OR DELETE ON consent_record_purges
    FOR EACH ROW EXECUTE FUNCTION consent_record_purges_append_only();
CREATE TRIGGER consent_record_purges_no_truncate BEFORE TRUNCATE ON consent_record_purges
    FOR EACH STATEMENT EXECUTE FUNCTION consent_record_purges_append_only();

CREATE FUNCTION consent_records_retention_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.decided_at_ms >= coalesce((SELECT max(cutoff_ms) FROM consent_record_purges), -1)
    THEN
        RAISE EXCEPTION 'consent records are deleted only by the retention purge, once expired';
    END IF;
    RETURN OLD;
END;
$$;
CREATE TRIGGER consent_records_retention_only BEFORE DELETE ON consent_records
    FOR EACH ROW EXECUTE FUNCTION consent_records_retention_only();
-- TRUNCATE skips row triggers: refuse it outright.
CREATE TRIGGER consent_records_no_truncate BEFORE TRUNCATE ON consent_records
    FOR EACH STATEMENT EXECUTE FUNCTION consent_records_append_only();
