-- `pins` keeps no foreign key on `backends`.
--
-- The key's check ran for every pin-index row a success inserts: a query per row that
-- locks the backend's row, which a profile of the end-to-end benchmark put at 7 % of
-- PostgreSQL's time (docs/performance.md).
--
-- What the key guarded, the writers now guarantee:
-- - a success writes the pin rows of running jobs of that backend, and a backend with
--   any unfinished job is not deleted (`delete_backend` refuses it); a purge deletes
--   finished jobs only, waiting on the row lock of a job whose success is being written,
--   and deletes the backend's pin rows after that;
-- - the index update's insert of pins found on the node takes the key-share lock on the
--   backend's row that the key took, once per statement, and inserts nothing for a
--   backend that is gone;
-- - `delete_backend` deletes the backend's pin rows itself, after it holds the backend's
--   row locked (the key deleted them by ON DELETE CASCADE).
ALTER TABLE pins DROP CONSTRAINT pins_backend_id_fkey;

-- Rows a deleted backend left behind before this migration cannot exist (the key
-- cascaded), so there is nothing to clean.
