-- The time index also carries the IP and the visitor id. Without an index on either
-- (0013, 0014), a subject's hits are read hour by hour through this index; with both
-- columns in it, SQLite tests them on the index entry and reads the table row only
-- for a match: an address seen once in each of 24 hours on a store of 1M hits a day
-- took 102 ms instead of 313 (docs/PERFORMANCE.md, session 7). Its inserts stay
-- sequential (times only grow), so the writer measured no difference.
DROP INDEX hits_ts;
CREATE INDEX hits_ts ON hits (ts_ms, ip, visitor_id);
