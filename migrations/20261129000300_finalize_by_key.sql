-- Finalizing a batch's tasks walked every active task. The generic plan of
-- finalize_tasks' "the batch's tasks that are still pending or running"
-- (a join of the evaluated tasks with weft.tasks) was made when the
-- statistics said one task was active, and scanned the partial index of
-- active tasks, probing the batch for each: measured on a database with 200
-- active tasks, 200 index entries and 200 scans of the batch to finalize
-- one task, 0.6 ms; under a load of thousands of active tasks (W5, the W6
-- storm) it grows with them, for every batch. The task is now looked up by
-- key for each evaluated task (`offset 0` keeps PostgreSQL from turning the
-- lookup back into a join it may reorder), as weft.enqueue_steps does.

-- As in 20261128000600_cached_plans.sql, but for the lookup above.
create or replace function weft.finalize_tasks(p_task_ids uuid[], p_now timestamptz default null)
returns table (task_id uuid, state text, execution_status text, finalized boolean)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
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
        select c.task_id, c.execution_status, t.state as from_state,
               case
                   when c.execution_status = 'all_complete' then 'complete'
                   when c.execution_status = 'blocked_by_failures' and c.enqueued_steps = 0
                        and (t.on_failure = 'fail_fast'
                             or (c.ready_steps = 0 and c.retry_due_later_steps = 0)) then 'error'
               end as to_state
        from ctx c
        cross join lateral (
            select t.state, t.on_failure
              from weft.tasks t
             where t.id = c.task_id and t.state in ('pending', 'running')
            offset 0
        ) t
    ),
    moved as (
        update weft.tasks t
           set state = d.to_state, finished_at = v_now,
               started_at = coalesce(t.started_at, v_now),
               updated_at = v_now
          from decided d
         where t.id = d.task_id and d.to_state is not null and t.state = d.from_state
        returning t.id, d.from_state, d.to_state, d.execution_status
    ),
    recorded as (
        insert into weft.task_transitions (task_id, from_state, to_state, reason, at)
        select m.id, m.from_state, m.to_state,
               case m.to_state when 'error' then 'blocked_by_failures' end, v_now
        from moved m
        returning task_id
    )
    select m.id, m.to_state, m.execution_status, true
    from moved m
    union all
    -- `not in` over a CTE is a hashed subplan: linear, unlike a join here.
    select c.task_id, t.state, c.execution_status, false
    from ctx c
    join weft.tasks t on t.id = c.task_id
    where c.task_id not in (select m.id from moved m);
end
$$;
