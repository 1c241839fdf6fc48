-- weft.advance_tasks (the enqueue pass and finalize of a result batch, a
-- retry claim) read the clock itself, so the status-model test, which
-- evaluates every combination of step states at one fixed instant, could
-- not run it: its filters (the enqueue pass only for tasks with a step
-- pending or waiting for a retry, finalize only for tasks with no step in
-- flight) were covered by the engine's end-to-end tests alone. It now takes
-- `p_now` as the functions it calls do (null: the clock, read once the
-- task locks are held), and tests/it/status_model.rs checks what it
-- enqueues and how it leaves each task against the reference model.
--
-- A second signature beside the first would make every one-argument call
-- ambiguous, so the function is replaced; its callers name it in PL/pgSQL
-- bodies, resolved when they run.
drop function weft.advance_tasks(uuid[]);

-- As in 20261129000600_enqueue_only_movable_tasks.sql, passing p_now on.
create function weft.advance_tasks(p_task_ids uuid[], p_now timestamptz default null)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
declare
    v_movable uuid[];
    v_idle uuid[];
    v_busy uuid[] := '{}';
    v_task uuid;
    v_enqueued jsonb := '[]';
    v_finalized jsonb := '[]';
begin
    -- Per task, by key (see 20261129000400): has it a step that could be
    -- enqueued, and has it a step in flight?
    select coalesce(array_agg(t.id) filter (where x.movable), '{}'),
           coalesce(array_agg(t.id) filter (where not x.in_flight), '{}')
      into v_movable, v_idle
      from unnest(p_task_ids) as t(id)
      cross join lateral (
          select coalesce(bool_or(s.state in ('pending', 'waiting_retry')), false) as movable,
                 coalesce(bool_or(s.state = 'enqueued'), false) as in_flight
            from weft.steps s
           where s.task_id = t.id
      ) x;

    if cardinality(v_movable) > 0 then
        with e as (select * from weft.enqueue_ready_steps(v_movable, p_now))
        select coalesce(jsonb_agg(jsonb_build_object(
                   'task_id', e.task_id, 'step_id', e.step_id, 'msg_id', e.msg_id,
                   'trace', e.trace)), '[]'),
               coalesce(array_agg(distinct e.task_id), '{}')
          into v_enqueued, v_busy
          from e;
        -- A task that just got a step enqueued has one in flight now
        -- (plain expressions: no statement per batch for this).
        foreach v_task in array v_busy loop
            v_idle := array_remove(v_idle, v_task);
        end loop;
    end if;

    -- A task with a step in flight cannot be finished (complete needs every
    -- step complete or resolved, error needs none enqueued).
    if cardinality(v_idle) > 0 then
        select coalesce(jsonb_agg(jsonb_build_object(
                   'task_id', f.task_id, 'state', f.state,
                   'execution_status', f.execution_status, 'finalized', f.finalized)), '[]')
          into v_finalized
          from weft.finalize_tasks(v_idle, p_now) f;
    end if;
    return jsonb_build_object('enqueued', v_enqueued, 'finalized', v_finalized);
end
$$;
