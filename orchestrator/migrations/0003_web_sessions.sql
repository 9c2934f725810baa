-- The web console's logins. The browser's cookie carries a random token; only its SHA-256
-- is kept here, so a copy of the database logs nobody in. Every replica sees every session.
CREATE TABLE web_sessions (
    token_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    -- The token every form and script request of this session must send back.
    csrf TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT NOT NULL
);
CREATE INDEX web_sessions_user ON web_sessions (user_name);
