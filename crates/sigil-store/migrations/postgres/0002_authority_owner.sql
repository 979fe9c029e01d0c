-- Per-server authorities: the instance ID of the server holding the private
-- key (empty for records written before instance IDs, adopted by the server
-- that has the key file), and the taint flag of a forced rotation.
ALTER TABLE authorities ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE authorities ADD COLUMN tainted BOOLEAN NOT NULL DEFAULT false;
