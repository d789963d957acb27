-- Hits already stored whose aggregates (rollups, IP statistics) the SQLite writer process
-- still holds in memory, as id ranges: written with the hits, deleted in the transaction
-- that writes those aggregates (docs/PERFORMANCE.md, session 5). A writer that finds
-- ranges here when it opens (its predecessor died) aggregates those hits from the raw
-- rows, and every rebuild leaves them out, so no hit is counted twice or never.
-- PostgreSQL never defers (every batch writes its own aggregates); the table is there
-- because the shared rebuild queries name it.
CREATE TABLE aggregate_pending (
    first_id BIGINT NOT NULL,
    last_id  BIGINT NOT NULL
);
