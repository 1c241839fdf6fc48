-- A result batch that completes the last step of a task finalized it
-- through weft.finalize_tasks, which computes every step's readiness and the
-- task's execution context to find what a task whose steps are all complete
-- or resolved always gets: `all_complete`, and `complete` if it was pending
-- or running. That is one statement and the costliest of a one-step task's
-- batch (0.20 of about 0.74 ms of execution, `pg_stat_statements` with
-- track = all). weft.advance_tasks already reads each touched task's steps
-- once; it now also tells which tasks have every step done and completes
-- them in one statement of its own (tests/it/status_model.rs checks it
-- against the reference model over every combination of step states).

-- As in 20261129000800_advance_at_a_given_time.sql, completing tasks whose
-- steps are all complete or resolved directly.
create or replace function weft.advance_tasks(p_task_ids uuid[], p_now timestamptz default null)
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
    v_done uuid[];
    v_now timestamptz;
    v_busy uuid[] := '{}';
    v_task uuid;
    v_enqueued jsonb := '[]';
    v_finalized jsonb := '[]';
begin
    -- Per task, by key (see 20261129000400): has it a step that could be
    -- enqueued, and has it a step in flight?
    select coalesce(array_agg(t.id) filter (where x.movable), '{}'),
           coalesce(array_agg(t.id) filter (where not x.in_flight and not x.done), '{}'),
           coalesce(array_agg(t.id) filter (where x.done), '{}')
      into v_movable, v_idle, v_done
      from unnest(p_task_ids) as t(id)
      cross join lateral (
          select coalesce(bool_or(s.state in ('pending', 'waiting_retry')), false) as movable,
                 coalesce(bool_or(s.state = 'enqueued'), false) as in_flight,
                 -- Every step complete or resolved (a task has one step at
                 -- least): nothing failed, ready or in flight, so its
                 -- execution status is all_complete and finalize completes it.
                 coalesce(bool_and(s.state in ('complete', 'resolved')), false) as done
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

    -- What weft.finalize_tasks does with such a task, without computing
    -- its readiness and execution context: one statement.
    if cardinality(v_done) > 0 then
        v_now := coalesce(p_now, clock_timestamp());
        with old as (
            select t.id, t.state from weft.tasks t where t.id = any (v_done)
        ),
        moved as (
            update weft.tasks t
               set state = 'complete', finished_at = v_now,
                   started_at = coalesce(t.started_at, v_now), updated_at = v_now
              from old
             where t.id = old.id and old.state in ('pending', 'running')
            returning t.id, old.state as from_state
        ),
        recorded as (
            insert into weft.task_transitions (task_id, from_state, to_state, at)
            select m.id, m.from_state, 'complete', v_now from moved m
        )
        select v_finalized || coalesce(jsonb_agg(jsonb_build_object(
                   'task_id', old.id,
                   'state', case when m.id is null then old.state else 'complete' end,
                   'execution_status', 'all_complete', 'finalized', m.id is not null)), '[]')
          into v_finalized
          from old left join moved m on m.id = old.id;
    end if;
    return jsonb_build_object('enqueued', v_enqueued, 'finalized', v_finalized);
end
$$;
