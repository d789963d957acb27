-- The batch writer notes the hours of its hits itself, in the transaction that inserts
-- them, and leaves out the rows it noted before (collector/subject_hours.py,
-- HoursNotes): these triggers probed both B-trees for every hit, ~2.4-2.8 µs of the
-- writer's CPU a hit (3.8 in a raw SQLite matrix), and nearly always found the row
-- there (docs/PERFORMANCE.md, session 11). It is the only code that inserts into hits (a test
-- forbids any other), so erasure and subject access still find every hit.
DROP TRIGGER hits_visitor_hours;
DROP TRIGGER hits_ip_hours;
-- The safety net for hits that reach the file some other way (an older version's writer
-- still running, a downgrade): the writer notes the hours of every hit above this id.
INSERT OR REPLACE INTO rollup_state (name, value)
    SELECT 'hours_noted', coalesce(max(id), 0) FROM hits;
