-- Portable SQL: the same migration runs on SQLite and PostgreSQL. Integers are BIGINT,
-- times are RFC 3339 text in UTC with a fixed width (so they sort as text), and ids come
-- from the counters table (no SERIAL/AUTOINCREMENT, which differ between the two).

CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('vm', 0);
INSERT INTO counters (name, value) VALUES ('job', 0);
INSERT INTO counters (name, value) VALUES ('node', 0);

CREATE TABLE users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    -- NULL: the cloud's default quota.
    cpu_quota BIGINT,
    memory_quota_mib BIGINT,
    vm_quota BIGINT,
    created TEXT NOT NULL
);

CREATE TABLE nodes (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    token TEXT NOT NULL,
    -- The admin's choice: enabled | disabled | maintenance.
    state TEXT NOT NULL,
    -- What polling found: new | up | down.
    health TEXT NOT NULL,
    cpu_total BIGINT NOT NULL DEFAULT 0,
    memory_total_mib BIGINT NOT NULL DEFAULT 0,
    running_vms BIGINT NOT NULL DEFAULT 0,
    load_1m DOUBLE PRECISION NOT NULL DEFAULT 0,
    disk_free_bytes BIGINT NOT NULL DEFAULT 0,
    agent_state TEXT,
    agent_version TEXT,
    hypervisor TEXT,
    hostname TEXT,
    -- Admin-set attributes for requirement expressions (JSON object of strings).
    attributes TEXT NOT NULL DEFAULT '{}',
    last_seen TEXT,
    last_error TEXT,
    created TEXT NOT NULL
);

CREATE TABLE vms (
    id BIGINT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    instance_type TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    swap_mib BIGINT NOT NULL,
    image TEXT NOT NULL,
    -- The validated run request, as JSON: what the node agent's spec is made from.
    request TEXT NOT NULL,
    node_id BIGINT,
    -- 1 while the VM counts against its owner's quotas and holds its lease and node room.
    holds BIGINT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX vms_owner ON vms (owner);
CREATE INDEX vms_node ON vms (node_id, holds);

CREATE TABLE vm_events (
    vm_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    at TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    PRIMARY KEY (vm_id, seq)
);

CREATE TABLE networks (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL
);

CREATE TABLE addresses (
    network TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ip TEXT NOT NULL,
    mac TEXT NOT NULL,
    vm_id BIGINT,
    PRIMARY KEY (network, ip)
);
CREATE INDEX addresses_free ON addresses (network, vm_id, seq);
CREATE INDEX addresses_vm ON addresses (vm_id);

CREATE TABLE jobs (
    id BIGINT PRIMARY KEY,
    vm_id BIGINT NOT NULL,
    action TEXT NOT NULL,
    -- queued | running | success | failed
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    claimed_by TEXT,
    lease_until TEXT,
    not_before TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    progress BIGINT NOT NULL DEFAULT 0,
    error TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX jobs_open ON jobs (state, not_before);
CREATE INDEX jobs_vm ON jobs (vm_id, state);
