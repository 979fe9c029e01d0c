-- Whether the agent's current SVID serial has been used in an authenticated
-- call; from then on the previous serial is refused (a copy of the old SVID
-- is possible theft). Existing records start unused, so an agent that was
-- renewing during the upgrade keeps its previous SVID until it uses the new.
ALTER TABLE agents ADD COLUMN serial_used BOOLEAN NOT NULL DEFAULT 0;
