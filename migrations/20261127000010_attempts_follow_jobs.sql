-- A job's attempt records are deleted with it, by the schema rather than by each delete.
--
-- The `attempts_without_key` migration dropped the foreign key from `job_attempts` to
-- `jobs` for the cost of its check on every record written, and with it the cascade that
-- cost nothing on the hot path. Since then retention and a backend's purge each deleted
-- the records themselves, and any other delete of jobs would have left them behind. This
-- trigger fires once per statement that deletes jobs (never on inserts or updates) and
-- deletes the records of every job the statement deleted.
CREATE FUNCTION pinq_delete_attempts_of_gone_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_attempts WHERE job_id IN (SELECT id FROM gone);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_delete_attempts
    AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT
    EXECUTE FUNCTION pinq_delete_attempts_of_gone_jobs();
