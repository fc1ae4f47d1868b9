-- lockn: no-transaction
-- GetStats counts finished generations by status from this index alone (an
-- index-only scan) instead of reading the table's wide rows: 30 ms instead
-- of 115 with 200,000 rows (`python -m bench.probes count-history`). The
-- retention sweep still finds expired rows by completed_at.
--
-- Built CONCURRENTLY beside the old index and swapped in, so that creates and
-- completions keep writing while a large history is indexed. Each statement
-- can run again after a crash at any point: an interrupted build leaves an
-- invalid generations_finished_next, which the first statement drops.
DROP INDEX CONCURRENTLY IF EXISTS generations_finished_next;
CREATE INDEX CONCURRENTLY generations_finished_next ON generations (completed_at)
    INCLUDE (status) WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED');
DROP INDEX CONCURRENTLY IF EXISTS generations_finished;
ALTER INDEX generations_finished_next RENAME TO generations_finished;
