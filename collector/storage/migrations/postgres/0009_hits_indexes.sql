-- collect_hits_source (0008) serves no query: statistics by source read the rollups
-- (source is a rollup dimension), and nothing selects raw hits by source. Each hit paid
-- for it on insert; dropping it is part of issue 8 (batch writer >= 100,000 rows/s).
DROP INDEX IF EXISTS collect_hits_source;
