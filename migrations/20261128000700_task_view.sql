-- A task as the API shows it, in one statement with cached plans. Reading a
-- task was two queries (the task with its execution status, the steps with
-- their readiness), each planned on every call (0.4-0.6 ms of planning and
-- 0.5-0.8 ms of execution, measured in W3), and `POST /v1/tasks` ran them
-- after creating the task: two round trips and half of the call's time.

-- {task: {id, namespace, template_name, template_version, state,
-- execution_status, on_failure, input, priority, created_at, started_at,
-- finished_at}, steps: [{id, name, handler, state, attempts, max_attempts,
-- depends_on, ready, output, last_error, next_attempt_at, enqueued_at,
-- finished_at}] in declaration order}, or null when there is no such task.
-- Volatile, so called after writes in the same statement (below) it sees them.
create function weft.task_view(p_task_id uuid)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
declare
    v_task jsonb;
    v_steps jsonb;
begin
    select jsonb_build_object(
               'id', t.id, 'namespace', t.namespace,
               'template_name', tp.name, 'template_version', tp.version,
               'state', t.state, 'execution_status', c.execution_status,
               'on_failure', t.on_failure, 'input', t.input, 'priority', t.priority,
               'created_at', t.created_at, 'started_at', t.started_at,
               'finished_at', t.finished_at)
      into v_task
      from weft.tasks t
      join weft.templates tp on tp.id = t.template_id
      left join weft.task_execution_context(array[p_task_id]) c on c.task_id = t.id
     where t.id = p_task_id;
    if v_task is null then
        return null;
    end if;

    select coalesce(jsonb_agg(jsonb_build_object(
               'id', s.id, 'name', s.name, 'handler', s.handler, 'state', s.state,
               'attempts', s.attempts - s.attempt_floor, 'max_attempts', s.max_attempts,
               'depends_on', to_jsonb(array(
                   select d.name from weft.step_edges e join weft.steps d on d.id = e.depends_on
                    where e.step_id = s.id order by d.position)),
               'ready', r.ready, 'output', s.output, 'last_error', s.last_error,
               'next_attempt_at', s.next_attempt_at, 'enqueued_at', s.enqueued_at,
               'finished_at', s.finished_at) order by s.position), '[]')
      into v_steps
      from weft.steps s
      join weft.step_readiness(array[p_task_id]) r on r.step_id = s.id
     where s.task_id = p_task_id;

    return jsonb_build_object('task', v_task, 'steps', v_steps);
end
$$;

-- `weft.create_tasks` followed by the view of the task it created, when it
-- created exactly one: `POST /v1/tasks` in one round trip. Parameters as
-- weft.create_tasks; returns its result plus `view` (absent when no task or
-- several were inserted).
create function weft.create_task_viewed(
    text, text, uuid[], bigint[], jsonb[], integer[], text[], text[], jsonb[],
    uuid[], uuid[], integer[], text[], text[], jsonb[], integer[], integer[],
    integer[], integer[], double precision[], text[], uuid[], uuid[], uuid[]
)
returns jsonb
language plpgsql
as $$
declare
    v_created jsonb;
begin
    v_created := weft.create_tasks($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                                   $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24);
    if jsonb_array_length(v_created -> 'inserted') = 1 then
        v_created := v_created || jsonb_build_object(
            'view', weft.task_view((v_created -> 'inserted' ->> 0)::uuid));
    end if;
    return v_created;
end
$$;
