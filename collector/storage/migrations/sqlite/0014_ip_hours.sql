-- The UTC hours (ts_ms / 3,600,000) in which each IP address has hits, in place of the
-- hits_ip index: client addresses are random keys, so each hit's insert went to a random
-- page of that B-tree and each batch's commit wrote most of its pages again, ~7 µs of
-- the writer's CPU per hit with 400,000 hits stored, the largest cost left on the write
-- path (collector/subject_hours.py; docs/PERFORMANCE.md, session 7). An address returns
-- within the hour, so the trigger mostly finds its row there and writes nothing. It
-- fills the table on every insert into hits, whichever code inserts, so IP lookups,
-- subject access, erasure and blocking always find every hit of an address.
CREATE TABLE ip_hours (
    ip   TEXT    NOT NULL,
    hour INTEGER NOT NULL,
    PRIMARY KEY (ip, hour)
) WITHOUT ROWID;
CREATE TRIGGER hits_ip_hours AFTER INSERT ON hits
BEGIN
    INSERT OR IGNORE INTO ip_hours (ip, hour) VALUES (NEW.ip, NEW.ts_ms / 3600000);
END;
INSERT OR IGNORE INTO ip_hours (ip, hour) SELECT ip, ts_ms / 3600000 FROM hits;
DROP INDEX hits_ip;
