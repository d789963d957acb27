-- App and server-side collection (POST /collect): the event's own facts beside the hit,
-- and the (app instance, event id) keys that make retried batches count once.
ALTER TABLE hits ADD COLUMN event_id TEXT;          -- client-generated, unique per app instance
ALTER TABLE hits ADD COLUMN event_type TEXT;        -- page_view, screen_view, ad_impression
ALTER TABLE hits ADD COLUMN client_ts_ms INTEGER;   -- 3.3.4 as the client reported it (untrusted)
ALTER TABLE hits ADD COLUMN received_ms INTEGER;    -- when the server received the batch
ALTER TABLE hits ADD COLUMN time_flag TEXT;         -- NULL, 'future' or 'stale': ts_ms was clamped
ALTER TABLE hits ADD COLUMN app_version TEXT;
ALTER TABLE hits ADD COLUMN device_model TEXT;      -- as declared by the app, e.g. iPhone14,2
CREATE INDEX collect_hits_source ON hits (source, ts_ms);

CREATE TABLE collect_dedupe (
    instance_id TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    seen_ms     INTEGER NOT NULL,
    PRIMARY KEY (instance_id, event_id)
);
CREATE INDEX collect_dedupe_seen ON collect_dedupe (seen_ms);
