-- A successful attempt is recorded on the job's row alone, not in `job_attempts`.
--
-- A success already leaves everything its record held on the row: the attempt's number
-- (`attempt`), when it started (`started_at`, set by the claim) and ended
-- (`finished_at`). Only the worker was missing, as the success clears `lease_owner`; it
-- is kept in `succeeded_by`. `job_attempts` keeps the attempts that ended any other way
-- (retry, failure, cancel, hand-back, a lease the relay found expired), and
-- `db::job_attempts` lists a job's attempts from both, as it already listed the running
-- attempt from the row.
--
-- Writing a record per success was about a fifth of the success statement (a heap row,
-- a primary-key entry and their WAL for every job; `bench/success-replay/run.sh`) and
-- about 6 % of the WAL of a job's whole run; without it the end-to-end rate gained 3 to
-- 6 %, within the benchmark's noise (docs/performance.md).
--
-- Successes written before this migration keep their records, and `succeeded_by` NULL.
ALTER TABLE jobs ADD COLUMN succeeded_by uuid;

-- Records opened by a claim under the first scheme, of attempts still running: the
-- running attempt's record is its row, and a success no longer closes a record, so one
-- left open here would show that attempt as never ended.
DELETE FROM job_attempts a
USING jobs j
WHERE a.job_id = j.id AND a.attempt = j.attempt AND j.state = 'running' AND a.outcome IS NULL;
