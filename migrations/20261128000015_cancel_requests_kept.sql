-- A job whose cancellation was requested while it ran, and whose worker died before it
-- could stop it, was put back in the queue by the relay when the lease expired, with the
-- request still pending: another worker could run it again and report it succeeded, or,
-- if its message was lost, it stayed queued for good (the relay's safety net skips jobs
-- with a pending cancel request). The relay now ends such a job `cancelled`
-- (`db::relay_requeue`); this ends those it left waiting.
UPDATE jobs
SET state = 'cancelled', finished_at = now(), updated_at = now(), retry_at = NULL,
    blocked_by = NULL, last_error = 'cancelled by request'
WHERE state IN ('queued', 'retry_wait') AND cancel_requested;
