-- An iSCSI volume's own CHAP secret: made when a node first needs the volume, handed to
-- the node the volume is attached to and to tgtd, nowhere else.
ALTER TABLE volumes ADD COLUMN chap_secret TEXT;
