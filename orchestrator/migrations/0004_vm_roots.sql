-- A VM's root disk is a LIVE snapshot of the ORIGIN that caches its Marketplace image.
-- One ORIGIN per image: two deployments of a new image race to insert it, and the index
-- lets exactly one of them make it (StratusLab: "Disk already registered").
CREATE UNIQUE INDEX volumes_origin_identifier ON volumes (identifier)
    WHERE identifier IS NOT NULL AND kind IN ('MACHINE_IMAGE_ORIGIN', 'DATA_IMAGE_ORIGIN');
-- The collector looks for quarantined snapshots whose time is up.
CREATE INDEX volumes_quarantine ON volumes (quarantine);
