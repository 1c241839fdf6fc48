-- The status model: which steps may run, and what a task is doing, decided in
-- SQL from step states alone. Every function takes the task ids it looks at
-- and the current time as parameters, so the engine evaluates many tasks per
-- round trip and tests control the clock. The Rust reference model in
-- tests/it/status_model.rs checks these against every combination of states.

-- Per step: the parts of readiness and the verdict.
--   dependencies_satisfied: every dependency is complete or resolved
--   eligible: the first attempt of a budget always; later ones only while
--             retryable and below max_attempts
--   backoff_elapsed: no retry due time, or it has passed
--   ready: pending or waiting_retry, and all three above
--   failed: can never complete: error, cancelled, or waiting to run again
--           while no attempt is left
create function weft.step_readiness(p_task_ids uuid[], p_now timestamptz default null)
returns table (
    task_id uuid,
    step_id uuid,
    name text,
    state text,
    dependencies_satisfied boolean,
    eligible boolean,
    backoff_elapsed boolean,
    ready boolean,
    failed boolean
)
language sql stable as $$
    select s.task_id, s.id, s.name, s.state,
           d.satisfied,
           e.eligible,
           b.elapsed,
           s.state in ('pending', 'waiting_retry') and d.satisfied and e.eligible and b.elapsed,
           s.state in ('error', 'cancelled')
               or (s.state in ('pending', 'waiting_retry') and not e.eligible)
    -- A join, not `task_id = any (array)`: with thousands of ids a filter
    -- scans the whole array per row, a join hashes it once.
    from (select distinct id from unnest(p_task_ids) as ids(id)) ids
    join weft.steps s on s.task_id = ids.id
    cross join lateral (
        select coalesce(bool_and(dep.state in ('complete', 'resolved')), true) as satisfied
        from weft.step_edges edge
        join weft.steps dep on dep.id = edge.depends_on
        where edge.step_id = s.id
    ) d
    cross join lateral (
        select s.attempts = s.attempt_floor
               or (s.retryable and s.attempts - s.attempt_floor < s.max_attempts) as eligible
    ) e
    cross join lateral (
        select s.next_attempt_at is null or s.next_attempt_at <= coalesce(p_now, now()) as elapsed
    ) b
$$;

-- Per task: counts per state, readiness counts, and the execution status with
-- the fixed precedence
--   blocked_by_failures > has_ready_steps > processing > all_complete > waiting_for_dependencies.
-- A permanent failure wins over everything: a task that cannot complete is
-- blocked, whatever else is runnable.
create function weft.task_execution_context(p_task_ids uuid[], p_now timestamptz default null)
returns table (
    task_id uuid,
    total_steps integer,
    pending_steps integer,
    enqueued_steps integer,
    waiting_retry_steps integer,
    complete_steps integer,
    error_steps integer,
    cancelled_steps integer,
    resolved_steps integer,
    ready_steps integer,
    failed_steps integer,
    -- waiting_retry steps that will become ready once their backoff elapses
    retry_due_later_steps integer,
    next_retry_at timestamptz,
    execution_status text
)
language sql stable as $$
    with counts as (
        select r.task_id,
               count(*)::int as total,
               count(*) filter (where r.state = 'pending')::int as pending,
               count(*) filter (where r.state = 'enqueued')::int as enqueued,
               count(*) filter (where r.state = 'waiting_retry')::int as waiting_retry,
               count(*) filter (where r.state = 'complete')::int as complete,
               count(*) filter (where r.state = 'error')::int as error,
               count(*) filter (where r.state = 'cancelled')::int as cancelled,
               count(*) filter (where r.state = 'resolved')::int as resolved,
               count(*) filter (where r.ready)::int as ready,
               count(*) filter (where r.failed)::int as failed,
               count(*) filter (where r.state = 'waiting_retry' and r.eligible
                                  and not r.backoff_elapsed)::int as retry_later
        from weft.step_readiness(p_task_ids, p_now) r
        group by r.task_id
    )
    select c.task_id, c.total, c.pending, c.enqueued, c.waiting_retry, c.complete, c.error,
           c.cancelled, c.resolved, c.ready, c.failed, c.retry_later,
           (select min(s.next_attempt_at) from weft.steps s
             where s.task_id = c.task_id and s.state = 'waiting_retry'),
           case
               when c.failed > 0 then 'blocked_by_failures'
               when c.ready > 0 then 'has_ready_steps'
               when c.enqueued > 0 then 'processing'
               when c.complete + c.resolved = c.total then 'all_complete'
               else 'waiting_for_dependencies'
           end
    from counts c
$$;

-- Retry delay in milliseconds before attempt n + 1 after attempt n failed:
-- exponential from `initial`, capped at `max`, with jitter, and never sooner
-- than a handler's retry_after. p_rand in [0, 1) is passed in so tests can pin it.
create function weft.retry_delay_ms(
    p_attempt integer,
    p_initial_ms integer,
    p_max_ms integer,
    p_multiplier double precision,
    p_jitter text,
    p_retry_after_ms bigint,
    p_rand double precision
) returns bigint language sql immutable as $$
    select greatest(
        coalesce(p_retry_after_ms, 0),
        case p_jitter
            when 'full' then floor(base * p_rand)
            when 'equal' then floor(base / 2 + base / 2 * p_rand)
            else floor(base)
        end
    )::bigint
    from (
        -- exp(ln(m) * n) with the exponent capped, so huge attempt numbers or
        -- multipliers saturate at the cap instead of overflowing.
        select least(p_max_ms::double precision,
                     p_initial_ms * exp(least(ln(p_multiplier) * greatest(p_attempt - 1, 0), 50))) as base
    ) b
$$;
