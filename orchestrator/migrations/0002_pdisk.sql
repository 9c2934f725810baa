-- pdisk: persistent volumes and where they are attached.

CREATE TABLE volumes (
    uuid TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    tag TEXT NOT NULL,
    size_gib BIGINT NOT NULL,
    -- private | public
    visibility TEXT NOT NULL,
    -- StratusLab's six types (DATA_IMAGE_RAW_READ_WRITE by default).
    kind TEXT NOT NULL,
    identifier TEXT,
    seed BIGINT NOT NULL DEFAULT 0,
    base_uuid TEXT,
    quarantine TEXT,
    pool TEXT NOT NULL,
    -- creating | available | deleting: a volume is made and removed in two steps, so a
    -- restart finishes what a killed orchestrator left half-done.
    state TEXT NOT NULL,
    -- Where the node finds it (a file path for the file backend).
    location TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX volumes_owner ON volumes (owner);

-- One row per attached volume: the primary key is the exclusive-attach rule itself, so two
-- attach requests for one volume can never both succeed, whatever the database.
CREATE TABLE mounts (
    volume_uuid TEXT PRIMARY KEY,
    vm_id BIGINT NOT NULL,
    -- The guest device StratusLab named it by (vda… at boot, vdz downwards when hot-plugged).
    device TEXT NOT NULL,
    hotplugged BIGINT NOT NULL,
    -- attaching | attached | detaching
    state TEXT NOT NULL,
    -- 1 for another user's public volume: they may read it, never write it.
    read_only BIGINT NOT NULL,
    -- The attach or detach job working on it (each job carries out its own volume only).
    job BIGINT,
    created TEXT NOT NULL
);
CREATE INDEX mounts_vm ON mounts (vm_id);
