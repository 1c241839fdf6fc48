-- A result batch finalized every task it touched that got nothing enqueued,
-- including tasks with another step still running (W3: B's result while C
-- runs; W5 the same), which finalize_tasks can never move: complete needs
-- every step complete or resolved, error needs no step enqueued. Evaluating
-- them (the readiness of every step and the task's counts) was 0.3 ms of
-- such a batch, and the next result of the task waited for it on the task
-- lock. Now only tasks with no step enqueued are evaluated; what a batch
-- reports as finalized is unchanged (tasks it did not move were reported
-- with finalized = false and are now left out).

-- As in 20261128000600_cached_plans.sql, but for the filter above.
create or replace function weft.advance_tasks(p_task_ids uuid[])
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
declare
    v_enqueued jsonb;
    v_busy uuid[];
    v_idle uuid[];
    v_finalized jsonb := '[]';
begin
    with e as (select * from weft.enqueue_ready_steps(p_task_ids))
    select coalesce(jsonb_agg(jsonb_build_object(
               'task_id', e.task_id, 'step_id', e.step_id, 'msg_id', e.msg_id,
               'trace', e.trace)), '[]'),
           coalesce(array_agg(distinct e.task_id), '{}')
      into v_enqueued, v_busy
      from e;

    -- A task with a step in flight cannot be finished either (complete needs
    -- every step complete or resolved, error needs none enqueued): only the
    -- others are evaluated.
    -- The steps are read per task by key: written as a plain `not exists
    -- (… state = 'enqueued')`, the generic plan scanned the index of every
    -- enqueued step once per task of the batch (W6 storm: 80,000 rows
    -- for a batch of 90, 8.5 ms); `offset 0` keeps the state test out of
    -- the lookup, so only the task's own steps are read.
    v_idle := array(select t from unnest(p_task_ids) t
                     where t not in (select b from unnest(v_busy) b)
                       and not exists (select 1
                                         from (select s.state from weft.steps s
                                                where s.task_id = t offset 0) x
                                        where x.state = 'enqueued'));
    if cardinality(v_idle) > 0 then
        select coalesce(jsonb_agg(jsonb_build_object(
                   'task_id', f.task_id, 'state', f.state,
                   'execution_status', f.execution_status, 'finalized', f.finalized)), '[]')
          into v_finalized
          from weft.finalize_tasks(v_idle) f;
    end if;
    return jsonb_build_object('enqueued', v_enqueued, 'finalized', v_finalized);
end
$$;
