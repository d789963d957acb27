-- visitor_hours keyed by (hour, visitor_id) instead of (visitor_id, hour), as on SQLite
-- (its 0017): a new visitor's row went to a random leaf of the key's B-tree, and each
-- first write to a page after a checkpoint logs the whole page. By hour first, the rows
-- of the current hour go to the right edge of the index. A visitor's hours are read with
-- a seek per stored hour (collector/storage/keys.py). The trigger inserts in the new key
-- order, so two nodes noting the same hours still cannot deadlock.
ALTER TABLE visitor_hours DROP CONSTRAINT visitor_hours_pkey;
ALTER TABLE visitor_hours ADD PRIMARY KEY (hour, visitor_id);
CREATE OR REPLACE FUNCTION note_visitor_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO visitor_hours (hour, visitor_id)
        SELECT DISTINCT ts_ms / 3600000, visitor_id FROM inserted_hits
        WHERE visitor_id <> '' ORDER BY 1, 2
        ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
