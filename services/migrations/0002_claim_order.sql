-- Claim order with aging: each priority point is worth a fixed number of
-- seconds of waiting, so a row's place is fixed when it is created (and kept
-- when it is re-queued) and low priority is never starved. One indexed key
-- keeps a claim an index scan however deep the queue.
ALTER TABLE generations ADD COLUMN claim_key double precision NOT NULL DEFAULT 0;
DROP INDEX generations_queued;
CREATE INDEX generations_queued ON generations (claim_key) WHERE status = 'QUEUED';
-- Listing by status for stats and pruning of finished rows.
CREATE INDEX generations_finished ON generations (completed_at)
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED');
