-- The UTC hours (ts_ms / 3,600,000) in which each visitor id has hits, in place of the
-- hits_visitor index: its random-key inserts cost the writer ~10 µs per hit once the
-- file holds a few hundred thousand hits (collector/visitor_hours.py; docs/PERFORMANCE.md,
-- session 6). The trigger fills it on every insert into hits, whichever code inserts, so
-- subject access, erasure and blocking always find every hit of a visitor.
CREATE TABLE visitor_hours (
    visitor_id TEXT    NOT NULL,
    hour       INTEGER NOT NULL,
    PRIMARY KEY (visitor_id, hour)
) WITHOUT ROWID;
CREATE TRIGGER hits_visitor_hours AFTER INSERT ON hits WHEN NEW.visitor_id <> ''
BEGIN
    INSERT OR IGNORE INTO visitor_hours (visitor_id, hour)
        VALUES (NEW.visitor_id, NEW.ts_ms / 3600000);
END;
INSERT OR IGNORE INTO visitor_hours (visitor_id, hour)
    SELECT visitor_id, ts_ms / 3600000 FROM hits WHERE visitor_id <> '';
DROP INDEX hits_visitor;
