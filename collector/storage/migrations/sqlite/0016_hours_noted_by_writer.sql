-- The batch writer notes the hours of its hits itself, in the transaction that inserts
-- them: one INSERT OR IGNORE ... SELECT per table over the ids it just wrote
-- (collector/subject_hours.py). These triggers ran their program for every hit; the two
-- statements cost ~1.4-1.6 µs of the writer's CPU a hit less (docs/PERFORMANCE.md,
-- session 11). The writer is the only code that inserts into hits (a test forbids any
-- other), and the mark below catches hits that reach the file some other way (an older
-- version's writer still running, a downgrade): every batch and every open notes the
-- hours of all ids above it.
DROP TRIGGER IF EXISTS hits_visitor_hours;
DROP TRIGGER IF EXISTS hits_ip_hours;
INSERT OR REPLACE INTO rollup_state (name, value)
    SELECT 'hours_noted', coalesce(max(id), 0) FROM hits;
