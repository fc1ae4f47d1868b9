-- What a request_id stands for: a digest of the create request as the caller
-- sent it, so that a retry gets the first generation and a different request
-- under the same key is refused. Rows created before it have none and match
-- any retry, as before. A nullable column without a default: no table rewrite.
ALTER TABLE generations ADD COLUMN request_digest bytea;
