-- visitor_hours keyed by (hour, visitor_id) instead of (visitor_id, hour). A new visitor's
-- row went to a random page of the table, so once the table outgrew the page cache each
-- noting of the hours read and rewrote most of its pages, more with every hour the store
-- kept: the writer's largest cost on a grown store (docs/PERFORMANCE.md, session 14). By
-- hour first, every row of the current hour goes to the end of the B-tree. A visitor's
-- hours are read with a seek per stored hour (collector/storage/keys.py), by a person,
-- rarely. ip_hours keeps (ip, hour): an engineer's IP lookup reads it on every page.
CREATE TABLE visitor_hours_by_hour (
    hour       INTEGER NOT NULL,
    visitor_id TEXT    NOT NULL,
    PRIMARY KEY (hour, visitor_id)
) WITHOUT ROWID;
INSERT INTO visitor_hours_by_hour (hour, visitor_id)
    SELECT hour, visitor_id FROM visitor_hours ORDER BY hour, visitor_id;
DROP TABLE visitor_hours;
ALTER TABLE visitor_hours_by_hour RENAME TO visitor_hours;
