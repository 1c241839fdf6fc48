-- A collector batch in one statement, the read included. The collector used
-- to read its results with pgmq's read (hide them for the result lease:
-- an update of every row, a transaction and a WAL flush of its own), then
-- apply them in a second statement. Now one statement picks the oldest
-- visible results with `FOR UPDATE SKIP LOCKED` (a row lock, no new row
-- version), applies them and deletes them, so a batch is one round trip and
-- one commit, and concurrent collectors still never take the same result.
-- If the orchestrator dies mid-batch its transaction aborts and the results
-- are visible again at once, with no lease to wait out.
--
-- The read no longer passes through the orchestrator's decoder first, so
-- the statement checks each message itself. weft.checked_result accepts
-- only messages that are plainly well formed (every check here is at least
-- as strict as the protocol's decoder: tests/it/engine.rs compares the two
-- over generated messages); anything it does not accept is leased
-- (pgmq's way: vt and read_ct) and handed back to the orchestrator, whose
-- decoder dead-letters it with the exact reason, or applies it when it was
-- merely unusual (a braced uuid, a lower-case `z` offset).

-- A JSON value that is absent, null, or an RFC 3339 date-time string with
-- a real calendar date (`T` separator, `Z` or a numeric offset).
create function weft.rfc3339_or_null(p_value jsonb)
returns boolean
language sql immutable parallel safe
as $$
    select case
        when p_value is null or jsonb_typeof(p_value) = 'null' then true
        when jsonb_typeof(p_value) <> 'string' then false
        when (p_value #>> '{}') !~ ('^[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])'
                                    'T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?'
                                    '(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$') then false
        -- The day exists in its month (the regex admits 2026-02-31).
        else substr(p_value #>> '{}', 9, 2)::integer
             <= extract(day from make_date(substr(p_value #>> '{}', 1, 4)::integer,
                                           substr(p_value #>> '{}', 6, 2)::integer, 1)
                                 + interval '1 month' - interval '1 day')
    end
$$;

-- A result message (docs/protocol/result-message.v1.schema.json) rebuilt
-- from the fields the protocol defines, or null when it is not plainly well
-- formed. Written as one CASE so the checks run in order and no cast ever
-- sees a value it would refuse (a failed cast would abort the batch).
-- Stable, not immutable, because jsonb_build_object is: PostgreSQL inlines
-- a SQL function into its caller only when the declared volatility covers
-- its body, and one that is not inlined is planned again at every call
-- (measured: 0.4 ms of a one-result batch).
create function weft.checked_result(p_message jsonb)
returns jsonb
language sql stable parallel safe
as $$
    select case
        when jsonb_typeof(p_message) is distinct from 'object' then null
        when jsonb_typeof(p_message -> 'v') is distinct from 'number'
             or p_message ->> 'v' <> '1' then null
        when jsonb_typeof(p_message -> 'task_id') is distinct from 'string'
             or p_message ->> 'task_id'
                !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then null
        when jsonb_typeof(p_message -> 'step_id') is distinct from 'string'
             or p_message ->> 'step_id'
                !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then null
        -- 1 to 999,999,999, written as an integer (`1.0` is a float to the decoder).
        when jsonb_typeof(p_message -> 'attempt') is distinct from 'number'
             or p_message ->> 'attempt' !~ '^[1-9][0-9]{0,8}$' then null
        when coalesce(jsonb_typeof(p_message -> 'worker'), 'null') not in ('string', 'null') then null
        when not weft.rfc3339_or_null(p_message -> 'started_at') then null
        when not weft.rfc3339_or_null(p_message -> 'finished_at') then null
        when jsonb_typeof(p_message -> 'status') is distinct from 'string' then null
        when p_message ->> 'status' = 'success' then
            jsonb_build_object('status', 'success',
                               'output', coalesce(p_message -> 'output', 'null'))
        when p_message ->> 'status' not in ('retryable', 'permanent') then null
        when jsonb_typeof(p_message -> 'error') is distinct from 'object'
             or jsonb_typeof(p_message -> 'error' -> 'message') is distinct from 'string'
             or jsonb_typeof(p_message -> 'error' -> 'reason') is distinct from 'string' then null
        when p_message ->> 'status' = 'permanent' then
            jsonb_build_object('status', 'permanent',
                               'error', jsonb_build_object(
                                   'message', p_message -> 'error' -> 'message',
                                   'reason', p_message -> 'error' -> 'reason'))
        -- retryable: retry_after_ms absent, null, or a whole number of ms that fits a bigint.
        when coalesce(jsonb_typeof(p_message -> 'retry_after_ms'), 'null') <> 'null'
             and (jsonb_typeof(p_message -> 'retry_after_ms') <> 'number'
                  or p_message ->> 'retry_after_ms' !~ '^(0|[1-9][0-9]{0,17})$') then null
        else
            jsonb_build_object('status', 'retryable',
                               'error', jsonb_build_object(
                                   'message', p_message -> 'error' -> 'message',
                                   'reason', p_message -> 'error' -> 'reason'))
            || jsonb_strip_nulls(jsonb_build_object(
                   'retry_after_ms', nullif(p_message -> 'retry_after_ms', 'null')))
    end
    || jsonb_build_object('v', 1,
                          'task_id', lower(p_message ->> 'task_id'),
                          'step_id', lower(p_message ->> 'step_id'),
                          'attempt', p_message -> 'attempt')
    || jsonb_strip_nulls(jsonb_build_object(
           'worker', nullif(p_message -> 'worker', 'null'),
           'started_at', nullif(p_message -> 'started_at', 'null'),
           'finished_at', nullif(p_message -> 'finished_at', 'null'),
           'trace', nullif(p_message -> 'trace', 'null')))
$$;

-- One collector batch: pick up to p_limit visible results (oldest first,
-- skipping rows another collector holds), apply the well-formed ones with
-- weft.collect_results (apply, due retries, enqueue, finalize, delete), and
-- lease the others for p_lease_secs. Returns collect_results' answer plus
-- {results: the applied messages as checked, in order; unchecked: [{msg_id,
-- read_ct, enqueued_at, message}] for the orchestrator to judge}; {} when
-- there was nothing to read.
create function weft.collect_batch(p_limit integer, p_lease_secs integer)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
declare
    v_ids bigint[];
    v_checked jsonb[];
    v_results jsonb;
    v_unchecked bigint[];
    v_out jsonb := '{}';
begin
    -- Checked once each, and only once locked: a check in the locking
    -- scan itself would also run on every row another collector holds.
    with picked as materialized (
        select q.msg_id, q.message
          from pgmq.q_weft_results q
         where q.vt <= clock_timestamp()
         order by q.msg_id
         limit p_limit
           for update skip locked
    ),
    checked as materialized (
        select p.msg_id, weft.checked_result(p.message) as checked from picked p
    )
    select array_agg(c.msg_id order by c.msg_id) filter (where c.checked is not null),
           array_agg(c.checked order by c.msg_id) filter (where c.checked is not null),
           array_agg(c.msg_id order by c.msg_id) filter (where c.checked is null)
      into v_ids, v_checked, v_unchecked
      from checked c;

    if v_ids is not null then
        v_results := to_jsonb(v_checked);
        v_out := weft.collect_results(v_results, v_ids) || jsonb_build_object('results', v_results);
    end if;

    if v_unchecked is not null then
        with leased as (
            update pgmq.q_weft_results q
               set last_read_at = clock_timestamp(),
                   vt = clock_timestamp() + make_interval(secs => p_lease_secs),
                   read_ct = q.read_ct + 1
             where q.msg_id = any (v_unchecked)
            returning q.msg_id, q.read_ct, q.enqueued_at, q.message
        )
        select v_out || jsonb_build_object('unchecked', jsonb_agg(to_jsonb(l) order by l.msg_id))
          into v_out
          from leased l;
    end if;
    return v_out;
end
$$;
