"""The SQL of the per-step path and PgStore, as text statements over arrays (`unnest`)."""

from __future__ import annotations

from sqlalchemy import text

from stepfleet.store.rows import STATE_COLUMNS

# Takes the instances' advisory locks (LOCK_INSTANCE_KEYS's) first, in key order: a create
# and the holding of an early event for the same instance serialise on them, and the
# transaction's next statement (ADOPT_EARLY_EVENTS) sees every event held before.
INSERT_INSTANCES = text(
    """
    WITH keys AS MATERIALIZED (
        SELECT count(pg_advisory_xact_lock(hashtextextended(k.tenant || '/' || k.id, 7)))
        FROM (SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]))
              AS u(tenant, id) ORDER BY 1, 2) AS k
    )
    INSERT INTO instances (tenant, id, module, status, params, retention_seconds, state_bytes)
    SELECT t, i, m, 'running', p, r, octet_length(p)
    FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]),
                CAST(:modules AS text[]), CAST(:params AS text[]), CAST(:retentions AS int[]))
         AS n(t, i, m, p, r) CROSS JOIN keys
    ON CONFLICT ON CONSTRAINT pk_instances DO NOTHING
    RETURNING tenant, id
    """
)

# STATE_COLUMNS is a constant column list, not input.
LOCK_INSTANCES = text(
    f"SELECT {STATE_COLUMNS} FROM instances "  # noqa: S608
    "WHERE (tenant, id) IN ("
    " SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])))"
    " ORDER BY tenant, id FOR UPDATE"
)

OWNED_MODULES = text(
    """
    SELECT tenant, digest FROM tenant_modules
    WHERE (tenant, digest) IN (
        SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:digests AS text[])))
    """
)

PARAMS = text(
    """
    SELECT tenant, id, params FROM instances
    WHERE (tenant, id) IN (
        SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])))
    """
)

JOURNAL_SINCE = text(
    """
    SELECT j.tenant, j.instance_id, j.seq, j.kind, j.name, j.value, j.attempt,
           j.started_at, j.finished_at, j.flags
    FROM journal AS j
    JOIN unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:froms AS int[]))
         AS r(tenant, instance_id, from_seq)
      ON j.tenant = r.tenant AND j.instance_id = r.instance_id AND j.seq >= r.from_seq
    ORDER BY j.tenant, j.instance_id, j.seq
    """
)

# How a write moves an instance row `i` to the state `u` (WRITE_BATCH, WRITE_UNCHANGED).
_NEW_STATE = """status = u.status, position = u.position, attempt = u.attempt,
    wait_kind = u.wait_kind, wait_name = u.wait_name, wait_event = u.wait_event,
    wait_timeout_ms = u.wait_timeout_ms, wake_at = u.wake_at, wake_sent_at = NULL,
    mode = u.mode, end_status = u.end_status, output = u.output, error = u.error,
    state_bytes = u.state_bytes, updated_at = now(),
    stalled_letter = NULL, stalled_reason = NULL, stalled_at = NULL,
    traceparent = coalesce(u.traceparent, i.traceparent),
    finished_at = CASE WHEN u.status IN ('complete', 'errored', 'terminated') THEN now() END,
    retain_until = CASE WHEN u.status IN ('complete', 'errored', 'terminated')
        THEN now() + make_interval(secs => coalesce(i.retention_seconds, :retention)) END"""

# Everything a batch writes, in one statement: forget confirmed outbox rows, append journal
# entries and failed attempts, move instance states, queue the next messages. Empty arrays make
# empty parts.
WRITE_BATCH = text(  # _NEW_STATE is a constant, not input
    f"""
    WITH confirmed AS (
        DELETE FROM outbox WHERE id = ANY(CAST(:confirmed AS bigint[]))
    ),
    entries AS (
        INSERT INTO journal (tenant, instance_id, seq, kind, name, value, attempt,
                             started_at, finished_at, flags)
        SELECT * FROM unnest(CAST(:j_tenants AS text[]), CAST(:j_ids AS text[]),
                             CAST(:seqs AS int[]), CAST(:kinds AS smallint[]),
                             CAST(:names AS text[]), CAST(:vals AS text[]),
                             CAST(:attempts AS int[]), CAST(:starts AS timestamptz[]),
                             CAST(:ends AS timestamptz[]), CAST(:flags AS smallint[]))
    ),
    failures AS (
        INSERT INTO step_attempts (tenant, instance_id, seq, attempt, name, error,
                                   started_at, finished_at)
        SELECT * FROM unnest(CAST(:a_tenants AS text[]), CAST(:a_ids AS text[]),
                             CAST(:a_seqs AS int[]), CAST(:a_attempts AS int[]),
                             CAST(:a_names AS text[]), CAST(:a_errors AS text[]),
                             CAST(:a_starts AS timestamptz[]), CAST(:a_ends AS timestamptz[]))
    ),
    states AS (
        UPDATE instances AS i
        SET {_NEW_STATE}
        FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:statuses AS text[]),
                    CAST(:positions AS int[]), CAST(:u_attempts AS int[]),
                    CAST(:wait_kinds AS text[]), CAST(:wait_names AS text[]),
                    CAST(:wait_events AS text[]), CAST(:wait_timeouts AS bigint[]),
                    CAST(:wake_ats AS timestamptz[]), CAST(:modes AS smallint[]),
                    CAST(:end_statuses AS text[]), CAST(:outputs AS text[]),
                    CAST(:errors AS text[]), CAST(:state_bytes AS bigint[]),
                    CAST(:traceparents AS text[]))
             AS u(tenant, id, status, position, attempt, wait_kind, wait_name, wait_event,
                  wait_timeout_ms, wake_at, mode, end_status, output, error, state_bytes,
                  traceparent)
        WHERE i.tenant = u.tenant AND i.id = u.id
    )
    INSERT INTO outbox (routing_key, headers, body)
    SELECT * FROM unnest(CAST(:keys AS text[]), CAST(:headers AS text[]),
                         CAST(:bodies AS bytea[]))
    RETURNING id
    """  # noqa: S608
)


def _written_by(rows: str) -> str:
    """The CTEs `entries`, `failures` and `queued` of a guarded statement (WRITE_UNCHANGED,
    WRITE_CREATED): the journal entries, failed attempts and next steps' outbox rows of its
    JSON parameters, for the instances the CTE `rows` (tenant, id) lets through only."""
    return f"""entries AS (
        INSERT INTO journal (tenant, instance_id, seq, kind, name, value, attempt,
                             started_at, finished_at, flags)
        SELECT e.* FROM jsonb_to_recordset(CAST(:entries AS jsonb)) AS e(
            tenant text, instance_id text, seq int, kind smallint, name text, value text,
            attempt int, started_at timestamptz, finished_at timestamptz, flags smallint)
        JOIN {rows} AS w ON w.tenant = e.tenant AND w.id = e.instance_id
    ),
    failures AS (
        INSERT INTO step_attempts (tenant, instance_id, seq, attempt, name, error,
                                   started_at, finished_at)
        SELECT a.* FROM jsonb_to_recordset(CAST(:failures AS jsonb)) AS a(
            tenant text, instance_id text, seq int, attempt int, name text, error text,
            started_at timestamptz, finished_at timestamptz)
        JOIN {rows} AS w ON w.tenant = a.tenant AND w.id = a.instance_id
    ),
    queued AS (
        INSERT INTO outbox (routing_key, headers, body)
        SELECT q.key, q.headers, decode(q.body, 'base64')
        FROM jsonb_to_recordset(CAST(:queued AS jsonb)) AS q(
            tenant text, id text, key text, headers text, body text, ord int)
        JOIN {rows} AS w ON w.tenant = q.tenant AND w.id = q.id
        ORDER BY q.ord
        RETURNING id
    )"""  # noqa: S608 (`rows` is one of this module's CTE names, never input)


# WRITE_BATCH for next steps a worker runs on the instance as it left it, in one statement
# and no transaction block: each write lands only where the row is still the expected one
# (locked in key order, the guard re-checked on the latest row), with its journal entries,
# its failed attempt, its next step's outbox row and the deletion of the row it finishes.
# Rows come as JSON documents (jsonb_to_recordset): encoded in C rather than array by array,
# and a short statement with few parameters, which psycopg converts once and caches.
# Answers the keys written, then the new outbox ids in order (the rest of the row is NULL).
WRITE_UNCHANGED = text(  # _NEW_STATE is a constant, not input
    f"""
    WITH confirmed AS (DELETE FROM outbox WHERE id = ANY(CAST(:confirmed AS bigint[]))),
    u AS MATERIALIZED (
        SELECT * FROM jsonb_to_recordset(CAST(:writes AS jsonb)) AS u(
            tenant text, id text, status text, position int, attempt int, wait_kind text,
            wait_name text, wait_event text, wait_timeout_ms bigint, wake_at timestamptz,
            mode smallint, end_status text, output text, error text, state_bytes bigint,
            traceparent text, finishes bigint, x_module text, x_status text,
            x_position int, x_generation int, x_attempt int, x_mode smallint,
            x_end_status text, x_error text, x_state_bytes bigint)
    ),
    locked AS MATERIALIZED (
        SELECT i.tenant, i.id FROM instances AS i JOIN u ON i.tenant = u.tenant AND i.id = u.id
        WHERE (i.module, i.status, i.position, i.generation, i.attempt, i.mode, i.state_bytes)
            = (u.x_module, u.x_status, u.x_position, u.x_generation, u.x_attempt, u.x_mode,
               u.x_state_bytes)
          AND i.end_status IS NOT DISTINCT FROM u.x_end_status
          AND i.error IS NOT DISTINCT FROM u.x_error AND i.wait_kind IS NULL
        ORDER BY i.tenant, i.id FOR UPDATE OF i
    ),
    finished AS (
        DELETE FROM outbox AS o USING u JOIN locked AS l ON l.tenant = u.tenant AND l.id = u.id
        WHERE o.id = u.finishes
    ),
    states AS (
        UPDATE instances AS i
        SET {_NEW_STATE}
        FROM u JOIN locked AS l ON l.tenant = u.tenant AND l.id = u.id
        WHERE i.tenant = u.tenant AND i.id = u.id
    ),
    {_written_by("locked")}
    SELECT tenant, id, NULL::bigint AS outbox_id FROM locked
    UNION ALL
    SELECT NULL, NULL, id FROM queued
    """  # noqa: S608
)

# True when no transaction that was running at the statement's snapshot (xip), or got its id
# since (from xmax up to this statement's own, asked for in a subquery so that the planner
# does not take it before the statement's locks), has committed: then the statement reads
# every row committed before its locks. Nothing can show what a transaction committed since.
NONE_COMMITTED_SINCE = """NOT EXISTS (
    SELECT FROM pg_current_snapshot() AS s, LATERAL (SELECT pg_snapshot_xip(s) AS x UNION ALL
        SELECT g::text::xid8 FROM generate_series(pg_snapshot_xmax(s)::text::bigint,
            (SELECT pg_current_xact_id())::text::bigint - 1) AS g) AS t
    WHERE pg_xact_status(t.x) = 'committed')"""

# A create's first step, run before its row exists, in one statement and no transaction block
# (as WRITE_UNCHANGED): the row is inserted in its new state unless it exists, and only rows
# inserted get the events held for them, their journal entries, failed attempts and next
# steps. The statement's snapshot predates its locks, so adoption is safe only if no hold of
# these keys (INSERT_INSTANCES's advisory locks, tried: never waited for) is under way, and
# none committed since the snapshot (NONE_COMMITTED_SINCE). Otherwise nothing is written
# ('calm' is 0) and the step transaction takes the creates. Answers 'new' keys, 'old' keys with their
# module, the new outbox ids in order, the events adopted and 'calm'.
WRITE_CREATED = text(  # NONE_COMMITTED_SINCE is a constant, not input
    f"""
    WITH confirmed AS (DELETE FROM outbox WHERE id = ANY(CAST(:confirmed AS bigint[]))),
    c AS MATERIALIZED (
        SELECT * FROM jsonb_to_recordset(CAST(:creates AS jsonb)) AS c(
            tenant text, id text, module text, params text, retention int, status text,
            position int, attempt int, wait_kind text, wait_name text, wait_event text,
            wait_timeout_ms bigint, wake_at timestamptz, mode smallint, end_status text,
            output text, error text, state_bytes bigint, traceparent text, final bool)
    ),
    calm AS MATERIALIZED (
        SELECT CASE WHEN bool_and(pg_try_advisory_xact_lock(
            hashtextextended(c.tenant || '/' || c.id, 7))) THEN {NONE_COMMITTED_SINCE}
            ELSE false END AS ok
        FROM c
    ),
    n AS (
        INSERT INTO instances (tenant, id, module, params, retention_seconds, status,
            position, attempt, wait_kind, wait_name, wait_event, wait_timeout_ms, wake_at,
            mode, end_status, output, error, state_bytes, traceparent, finished_at,
            retain_until)
        SELECT c.tenant, c.id, c.module, c.params, c.retention, c.status, c.position,
            c.attempt, c.wait_kind, c.wait_name, c.wait_event, c.wait_timeout_ms, c.wake_at,
            c.mode, c.end_status, c.output, c.error, c.state_bytes, c.traceparent,
            CASE WHEN c.final THEN now() END, CASE WHEN c.final
                THEN now() + make_interval(secs => coalesce(c.retention, :retention)) END
        FROM c JOIN calm ON calm.ok
        ON CONFLICT ON CONSTRAINT pk_instances DO NOTHING
        RETURNING tenant, id
    ),
    taken AS (
        DELETE FROM early_events AS e USING n WHERE e.tenant = n.tenant AND e.instance_id = n.id
        RETURNING e.tenant, e.instance_id, e.event_id, e.type, e.payload, e.received_at
    ),
    adopted AS (
        INSERT INTO events (tenant, instance_id, event_id, type, payload, received_at)
        SELECT * FROM taken ON CONFLICT ON CONSTRAINT pk_events DO NOTHING RETURNING 1
    ),
    {_written_by("n")}
    SELECT 'new' AS what, tenant, id, NULL AS module, NULL::bigint AS n FROM n
    UNION ALL SELECT 'old', i.tenant, i.id, i.module, NULL
        FROM instances AS i JOIN c ON i.tenant = c.tenant AND i.id = c.id
    UNION ALL SELECT 'outbox', NULL, NULL, NULL, id FROM queued
    UNION ALL SELECT 'adopted', NULL, NULL, NULL, count(*) FROM adopted
    UNION ALL SELECT 'calm', NULL, NULL, NULL, ok::int FROM calm
    """  # noqa: S608
)

# Take up to :need of the tenant's :cap running-step slots for this transaction; the locks are
# the slots, held by whichever workers' transactions run the tenant's steps right now.
GRANT_SLOTS = text(
    """
    SELECT count(*) FROM (
        SELECT slot
        FROM (SELECT slot_key FROM tenants WHERE name = :tenant) AS t
        CROSS JOIN generate_series(0, :cap - 1) AS slot
        WHERE pg_try_advisory_xact_lock(t.slot_key, slot)
        LIMIT :need
    ) AS taken
    """
)

# A token bucket shared by every worker, holding up to a second's worth (at least one token).
# Every step asked for takes a token, now or from the future: the bucket goes negative by the
# steps held back, which is their place in the line.
TAKE_TOKENS = text(
    """
    INSERT INTO tenant_rates AS r (tenant, tokens, updated_at)
    VALUES (:tenant, GREATEST(:rate, 1) - :need, now())
    ON CONFLICT (tenant) DO UPDATE SET
        tokens = LEAST(GREATEST(:rate, 1),
                       r.tokens + :rate * EXTRACT(EPOCH FROM now() - r.updated_at)) - :need,
        updated_at = now()
    RETURNING tokens + :need AS before
    """
)

KNOWN_EVENTS = text(
    """
    SELECT e.tenant, e.instance_id FROM events AS e
    JOIN unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:event_ids AS text[]))
         AS k(tenant, instance_id, event_id)
      ON e.tenant = k.tenant AND e.instance_id = k.instance_id AND e.event_id = k.event_id
    """
)

INSERT_EVENTS = text(
    """
    INSERT INTO events (tenant, instance_id, event_id, type, payload, consumed_seq)
    SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]),
                         CAST(:event_ids AS text[]), CAST(:types AS text[]),
                         CAST(:payloads AS text[]), CAST(:consumed AS int[]))
    ON CONFLICT ON CONSTRAINT pk_events DO NOTHING
    RETURNING tenant, instance_id
    """
)

# Early events (events for instances that do not exist yet) and the creates that take them
# serialise on one transaction-level advisory lock per instance key: whichever commits first,
# the other sees it (see docs/architecture.md, *Early events*).
LOCK_INSTANCE_KEYS = text(
    """
    SELECT count(pg_advisory_xact_lock(hashtextextended(k.tenant || '/' || k.id, 7)))
    FROM (SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])) AS u(tenant, id)
          ORDER BY 1, 2) AS k
    """
)

EXISTING_INSTANCES = text(
    """
    SELECT tenant, id FROM instances
    WHERE (tenant, id) IN (
        SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])))
    """
)

HOLD_EARLY_EVENTS = text(
    """
    INSERT INTO early_events (tenant, instance_id, event_id, type, payload, expires_at,
                              letter_exchange, letter_routing_key, letter_headers, letter_body)
    SELECT t, i, e, ty, p, now() + make_interval(secs => :hold), x, rk, h, b
    FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:event_ids AS text[]),
                CAST(:types AS text[]), CAST(:payloads AS text[]), CAST(:exchanges AS text[]),
                CAST(:keys AS text[]), CAST(:headers AS text[]), CAST(:bodies AS bytea[]))
         AS n(t, i, e, ty, p, x, rk, h, b)
    ON CONFLICT ON CONSTRAINT pk_early_events DO NOTHING
    """
)

# What each tenant's held events store now (records.held_bytes), and which of some events are
# held already (a repeat adds nothing).
HELD_BYTES = text(
    """
    SELECT tenant,
           sum(octet_length(payload) + octet_length(letter_headers) + octet_length(letter_body))
               AS bytes
    FROM early_events WHERE tenant = ANY(CAST(:tenants AS text[]))
    GROUP BY tenant
    """
)

ALREADY_HELD = text(
    """
    SELECT e.tenant, e.instance_id, e.event_id
    FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:event_ids AS text[]))
         AS n(t, i, ev)
    JOIN early_events AS e ON e.tenant = n.t AND e.instance_id = n.i AND e.event_id = n.ev
    """
)

# The instances were just inserted by this transaction: their held events become stored
# events, in arrival order, for the first waits of their types.
ADOPT_EARLY_EVENTS = text(
    """
    WITH taken AS (
        DELETE FROM early_events
        WHERE (tenant, instance_id) IN (
            SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])))
        RETURNING tenant, instance_id, event_id, type, payload, received_at
    )
    INSERT INTO events (tenant, instance_id, event_id, type, payload, received_at)
    SELECT tenant, instance_id, event_id, type, payload, received_at FROM taken
    ON CONFLICT ON CONSTRAINT pk_events DO NOTHING
    RETURNING tenant, instance_id
    """
)

# Held events whose hold ended: their dead letters go to the outbox, dated when the event
# arrived, so the next pass of the outbox relay publishes them.
EXPIRE_EARLY_EVENTS = text(
    """
    WITH gone AS (
        DELETE FROM early_events WHERE (tenant, instance_id, event_id) IN (
            SELECT tenant, instance_id, event_id FROM early_events
            WHERE expires_at <= now()
            ORDER BY expires_at LIMIT :limit FOR UPDATE SKIP LOCKED)
        RETURNING letter_exchange, letter_routing_key, letter_headers, letter_body, received_at
    )
    INSERT INTO outbox (exchange, routing_key, headers, body, created_at)
    SELECT letter_exchange, letter_routing_key, letter_headers, letter_body, received_at
    FROM gone
    RETURNING id
    """
)

HELD_EVENTS = text(
    """
    SELECT event_id, type, received_at, expires_at FROM early_events
    WHERE tenant = :tenant AND instance_id = :id
    ORDER BY received_at, event_id
    """
)

CLAIM_OUTBOX = text(
    """
    SELECT id, exchange, routing_key, headers, body FROM outbox
    WHERE created_at < now() - make_interval(secs => :age)
    ORDER BY id LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)

DUE_TIMERS = text(
    """
    WITH due AS (
        SELECT tenant, id FROM instances
        WHERE wake_at <= now() AND status IN ('queued', 'running', 'sleeping', 'waiting')
          AND stalled_letter IS NULL
          AND (wake_sent_at IS NULL OR wake_sent_at < now() - make_interval(secs => :resend))
        ORDER BY wake_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE instances AS i SET wake_sent_at = now()
    FROM due WHERE i.tenant = due.tenant AND i.id = due.id
    RETURNING i.tenant, i.id, i.module, i.position, i.attempt, i.generation, i.wake_at,
              i.traceparent
    """
)

# When the next timer not yet due is due: the first entry of the wake_at index past now(). It
# may be a paused or stalled row's, which DUE_TIMERS will not claim: a wasted claim then, where
# filtering them out here would walk past every such row on each poll.
NEXT_TIMER = text("SELECT min(wake_at) FROM instances WHERE wake_at > now()")

# What waits in the database, for the worker's gauges: timers past due whose instance has not
# taken its wake yet (sent or not), and outbox rows not deleted yet.
BACKLOG = text(
    """
    SELECT
        (SELECT count(*) FROM instances
         WHERE wake_at <= now() AND status IN ('queued', 'running', 'sleeping', 'waiting'))
            AS timers_due,
        (SELECT count(*) FROM outbox) AS outbox_waiting
    """
)

# One worker at a time fleet-wide, for the stall sweep and the statistics refresh: a
# transaction-scoped advisory lock; a worker that does not get it tries next time.
TRY_XACT_LOCK = text("SELECT pg_try_advisory_xact_lock(:key)")

# The stall sweep. Live instances not parked on a timer, not marked stalled, with no outbox
# row (the relay owns those) and neither progress nor a sweep for :age seconds; the rows are
# locked SKIP LOCKED (a row locked is being moved right now). NOT IN over the outbox's
# non-NULL keys is planned as one hashed subplan, not a scan of the outbox per candidate.
SWEEP_STALLED = text(
    """
    WITH found AS (
        SELECT i.tenant, i.id FROM instances AS i
        WHERE i.wait_kind IS NULL AND i.status IN ('queued', 'running')
          AND i.updated_at < now() - make_interval(secs => :age)
          AND (i.swept_at IS NULL OR i.swept_at < now() - make_interval(secs => :age))
          AND i.stalled_letter IS NULL
          AND (i.tenant, i.id) NOT IN (
              SELECT headers::json ->> 'x-tenant', headers::json ->> 'x-instance-id'
              FROM outbox
              WHERE headers::json ->> 'x-tenant' IS NOT NULL
                AND headers::json ->> 'x-instance-id' IS NOT NULL)
        ORDER BY i.updated_at
        LIMIT :limit
        FOR UPDATE OF i SKIP LOCKED
    )
    UPDATE instances AS i SET swept_at = now()
    FROM found WHERE i.tenant = found.tenant AND i.id = found.id
    RETURNING i.tenant, i.id, i.module, i.position, i.generation, i.updated_at
    """
)

DELETE_EXPIRED = text(
    """
    DELETE FROM instances WHERE (tenant, id) IN (
        SELECT tenant, id FROM instances WHERE retain_until < now()
        ORDER BY retain_until LIMIT :limit FOR UPDATE SKIP LOCKED)
    """
)

WAITING_EVENTS = text(
    """
    SELECT count(*) FROM events
    WHERE tenant = :tenant AND instance_id = :id AND consumed_seq IS NULL
    """
)

# The tables (of :tables) that have at least doubled in pages since PostgreSQL last analyzed
# them, and have :least pages or more: ANALYZE gives the planner their size again (see
# PgStore.refresh_statistics). relpages is what the last ANALYZE or VACUUM counted, 0 before.
# Only tables this user may analyze (it owns them, as docs/operations.md asks): ANALYZE would
# skip the others with a warning, and they would be found grown every time.
GROWN_TABLES = text(
    """
    SELECT c.relname AS name FROM pg_class AS c
    WHERE c.oid IN (SELECT to_regclass(t) FROM unnest(CAST(:tables AS text[])) AS t)
      AND pg_has_role(c.relowner, 'USAGE')
      AND pg_relation_size(c.oid) / current_setting('block_size')::int
          >= GREATEST(2 * c.relpages, :least)
    ORDER BY c.relname
    """
)
