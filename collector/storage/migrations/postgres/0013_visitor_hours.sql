-- The UTC hours (ts_ms / 3,600,000) in which each visitor id has hits, in place of the
-- hits_visitor index (collector/visitor_hours.py; docs/PERFORMANCE.md, session 6). The
-- statement trigger fills it from every insert into hits (one COPY per batch: one
-- INSERT here per batch), whichever node and code inserts, so subject access, erasure
-- and blocking always find every hit of a visitor. Rows go in key order, so two nodes
-- noting the same hours cannot deadlock. The trigger is made before the backfill: it
-- locks hits against inserts until this migration commits, so none falls in between.
CREATE TABLE visitor_hours (
    visitor_id TEXT   NOT NULL,
    hour       BIGINT NOT NULL,
    PRIMARY KEY (visitor_id, hour)
);
CREATE FUNCTION note_visitor_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO visitor_hours (visitor_id, hour)
        SELECT DISTINCT visitor_id, ts_ms / 3600000 FROM inserted_hits
        WHERE visitor_id <> '' ORDER BY 1, 2
        ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER hits_visitor_hours AFTER INSERT ON hits
    REFERENCING NEW TABLE AS inserted_hits
    FOR EACH STATEMENT EXECUTE FUNCTION note_visitor_hours();
INSERT INTO visitor_hours (visitor_id, hour)
    SELECT DISTINCT visitor_id, ts_ms / 3600000 FROM hits WHERE visitor_id <> ''
    ON CONFLICT DO NOTHING;
DROP INDEX hits_visitor;
