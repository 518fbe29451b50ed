-- The index update no longer writes every pin it finds on a backend.
--
-- It set `verified_at = now()` on each listed pin, every run: with 100,000 pins on a
-- backend, 100,000 row updates (and their index entries and WAL) every ten minutes, to
-- say "still there". A complete listing is now recorded once, on the backend, as the
-- time the listing began (`backends.pins_listed_at`), and a pin's verification time is
-- read as the later of its own `verified_at` and that mark.
--
-- The mark speaks for every `pinned` or `unmanaged` row of the backend, except the few
-- that the last complete listing did not show and that stayed (a pending job will settle
-- them, or they changed while the backend was being listed). Those carry `unlisted`, and
-- their own `verified_at` (brought up to the mark before, when they were last listed) is
-- their verification time. A later listing that shows them clears the flag. A row that
-- turns `missing` keeps, in its own `verified_at`, when it was last seen.
--
-- Until a backend's next complete listing the mark is NULL, and every row's own
-- `verified_at` is read as before.
ALTER TABLE backends ADD COLUMN pins_listed_at timestamptz;
ALTER TABLE pins ADD COLUMN unlisted boolean NOT NULL DEFAULT false;

-- The repair step reads a backend's missing pins, 1,000 at a time in CID order: from an
-- index of just those rows, where it read every pin of the backend for each chunk. With a
-- million pins, 10,000 of them missing, a chunk's read took 1.4 to 6.9 s; with this index
-- (and the check for pending jobs on `jobs.cid_key`, which `jobs_cid_key` serves) each
-- took under 0.3 s, and the run 20 s instead of 50. Few rows are ever missing, and a
-- row enters or leaves the index only when its pin goes missing or comes back. A pin's
-- insert only tests the predicate; an update that changes `status` (rare: a pin going
-- missing, coming back, or taken over from `unmanaged`) can no longer be heap-only.
CREATE INDEX pins_missing ON pins (backend_id, cid) WHERE status = 'missing';
