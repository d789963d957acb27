-- The UTC hours (ts_ms / 3,600,000) in which each IP address has hits, in place of the
-- hits_ip index (collector/subject_hours.py; docs/PERFORMANCE.md, session 7), as
-- visitor_hours (0013) replaced hits_visitor. The statement trigger fills it from every
-- insert into hits (one COPY per batch: one INSERT here per batch), whichever node and
-- code inserts, so IP lookups, subject access, erasure and blocking always find every
-- hit of an address. Rows go in key order, so two nodes noting the same hours cannot
-- deadlock. The trigger is made before the backfill: it locks hits against inserts
-- until this migration commits, so none falls in between.
CREATE TABLE ip_hours (
    ip   TEXT   NOT NULL,
    hour BIGINT NOT NULL,
    PRIMARY KEY (ip, hour)
);
CREATE FUNCTION note_ip_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ip_hours (ip, hour)
        SELECT DISTINCT ip, ts_ms / 3600000 FROM inserted_hits ORDER BY 1, 2
        ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER hits_ip_hours AFTER INSERT ON hits
    REFERENCING NEW TABLE AS inserted_hits
    FOR EACH STATEMENT EXECUTE FUNCTION note_ip_hours();
INSERT INTO ip_hours (ip, hour)
    SELECT DISTINCT ip, ts_ms / 3600000 FROM hits
    ON CONFLICT DO NOTHING;
DROP INDEX hits_ip;
