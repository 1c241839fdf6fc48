-- Cached plans on the hot path. Planning the status model's queries costs
-- 1-2 ms, executing them 0.1-0.3 ms for a batch of a few tasks, so a hop
-- that plans its queries on every call spends most of its time planning.
--
-- * SQL-language functions that cannot be inlined (data-modifying CTEs,
--   FOR UPDATE, aggregates) are planned on every call in PostgreSQL 15, so
--   the engine's become PL/pgSQL, whose statements keep their plans per
--   connection.
-- * PL/pgSQL picks custom plans (replanned per call) while they look cheaper
--   than the generic one, and with array parameters they always do. The hot
--   functions force the generic plan: it is planned once per connection, and
--   it does not swing to a different join strategy when a batch is large.
-- * A generic plan is kept for the life of the connection, so one made while
--   the tables were small (a fresh install, the first minute of a burst,
--   before autovacuum analyzes) would keep its sequential scans as the tables
--   grow: measured, a batch of 375 tasks then took 16 s instead of a few ms,
--   because the readiness subquery scanned every step once per step. Every
--   lookup on the hot path is by key on a small set of tasks, so the hot
--   functions rule out sequential scans, hash and merge joins: their plans are
--   index lookups in nested loops whatever the statistics say.

alter function weft.enqueue_ready_steps(uuid[], timestamptz, uuid[])
    set plan_cache_mode = force_generic_plan;
alter function weft.enqueue_ready_steps(uuid[], timestamptz, uuid[])
    set enable_seqscan = off;
alter function weft.enqueue_ready_steps(uuid[], timestamptz, uuid[])
    set enable_hashjoin = off;
alter function weft.enqueue_ready_steps(uuid[], timestamptz, uuid[])
    set enable_mergejoin = off;
alter function weft.apply_results(jsonb, timestamptz)
    set plan_cache_mode = force_generic_plan;
alter function weft.apply_results(jsonb, timestamptz)
    set enable_seqscan = off;
alter function weft.apply_results(jsonb, timestamptz)
    set enable_hashjoin = off;
alter function weft.apply_results(jsonb, timestamptz)
    set enable_mergejoin = off;

create or replace function weft.finalize_tasks(p_task_ids uuid[], p_now timestamptz default null)
returns table (task_id uuid, state text, execution_status text, finalized boolean)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
#variable_conflict use_column
declare
    -- A plain value, not a subquery: a set-returning SQL function is only
    -- inlined (and so planned once with this statement) when its arguments
    -- contain no subquery; otherwise it is planned again on every call.
    v_now timestamptz := coalesce(p_now, clock_timestamp());
begin
    return query
    with ctx as (
        select * from weft.task_execution_context(p_task_ids, v_now)
    ),
    decided as (
        select c.task_id, t.state as from_state,
               case
                   when c.execution_status = 'all_complete' then 'complete'
                   when c.execution_status = 'blocked_by_failures' and c.enqueued_steps = 0
                        and (t.on_failure = 'fail_fast'
                             or (c.ready_steps = 0 and c.retry_due_later_steps = 0)) then 'error'
               end as to_state
        from ctx c join weft.tasks t on t.id = c.task_id
        where t.state in ('pending', 'running')
    ),
    moved as (
        update weft.tasks t
           set state = d.to_state, finished_at = v_now,
               started_at = coalesce(t.started_at, v_now),
               updated_at = v_now
          from decided d
         where t.id = d.task_id and d.to_state is not null and t.state = d.from_state
        returning t.id, d.from_state, d.to_state
    ),
    recorded as (
        insert into weft.task_transitions (task_id, from_state, to_state, reason, at)
        select m.id, m.from_state, m.to_state,
               case m.to_state when 'error' then 'blocked_by_failures' end, v_now
        from moved m
        returning task_id
    )
    select c.task_id, coalesce(m.to_state, t.state), c.execution_status, m.id is not null
    from ctx c
    join weft.tasks t on t.id = c.task_id
    left join moved m on m.id = c.task_id;
end
$$;

create or replace function weft.claim_due_retry_tasks(p_now timestamptz, p_limit integer)
returns table (task_id uuid)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
#variable_conflict use_column
begin
    return query
    select t.id from weft.tasks t
    where t.id in (select p.task_id from weft.pending_retries() p where p.next_attempt_at <= p_now)
      and t.state in ('pending', 'running')
    order by t.id
    limit p_limit
    for update skip locked;
end
$$;

create or replace function weft.next_retry_at()
returns timestamptz
language plpgsql stable
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
begin
    return (select min(p.next_attempt_at) from weft.pending_retries() p);
end
$$;
