-- Task creation enqueues its root steps without a readiness pass. The
-- ready steps of a task just created are exactly the steps without
-- dependencies (pending, first attempt, no backoff, nothing failed), known
-- from the edges before anything is inserted; evaluating every step of the
-- new tasks to find them again was a third of the creating statement (W3:
-- 0.9 ms of `POST /v1/tasks`' 1.9, the critical path of every task). So the
-- enqueue itself becomes weft.enqueue_steps, given the steps to send, and
-- weft.enqueue_ready_steps is readiness followed by it.

-- Sends the given steps (each ready: pending or waiting_retry, its task
-- pending or running and locked by the caller or created in this
-- transaction) to their namespaces' queues and moves them to `enqueued`, in
-- task and declaration order. Steps in any other state are skipped.
create function weft.enqueue_steps(p_step_ids uuid[], p_now timestamptz)
returns table (task_id uuid, step_id uuid, msg_id bigint, trace jsonb)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
declare
    v_now timestamptz := coalesce(p_now, clock_timestamp());
    v_ns text;
    -- The batch, as parallel arrays (no temporary table: no catalog churn per call).
    v_task_ids uuid[];
    v_step_ids uuid[];
    v_namespaces text[];
    v_prev_states text[];
    v_attempts integer[];
    v_messages jsonb[];
    v_sent_messages jsonb[] := '{}';
    v_sent_ids bigint[] := '{}';
    v_msgs jsonb[];
    v_ids bigint[];
begin
    with batch as (
        select s.task_id, s.id, t.namespace, s.state, s.attempts + 1 as attempt,
               jsonb_build_object(
                   'v', 1,
                   'task_id', s.task_id,
                   'step_id', s.id,
                   'step', s.name,
                   'namespace', t.namespace,
                   'handler', s.handler,
                   'attempt', s.attempts + 1,
                   'config', s.config,
                   'input', t.input,
                   'dependencies', coalesce((
                       select jsonb_object_agg(dep.name, coalesce(dep.output, 'null'::jsonb))
                       from weft.step_edges e join weft.steps dep on dep.id = e.depends_on
                       where e.step_id = s.id), '{}'::jsonb),
                   'timeout_ms', s.timeout_ms,
                   'enqueued_at', v_now,
                   'trace', t.trace_context) as message
        from weft.steps s
        -- The task per step, by key. As a plain join, the generic plan
        -- (made when the statistics say "one active task") walked every
        -- active task and probed its steps for the batch's ids: linear in
        -- the active tasks, per call. `offset 0` keeps the lookup a lookup.
        cross join lateral (
            select t.namespace, t.input, t.trace_context
              from weft.tasks t
             where t.id = s.task_id and t.state in ('pending', 'running')
            offset 0
        ) t
        where s.id = any (p_step_ids)
          and s.state in ('pending', 'waiting_retry')
        order by s.task_id, s.position
    )
    select array_agg(b.task_id), array_agg(b.id), array_agg(b.namespace), array_agg(b.state),
           array_agg(b.attempt), array_agg(b.message)
      into v_task_ids, v_step_ids, v_namespaces, v_prev_states, v_attempts, v_messages
      from batch b;

    if v_step_ids is null then
        return;
    end if;

    -- One insert per namespace straight into its pgmq queue table. The
    -- statement is dynamic (the table is the namespace's), so PostgreSQL
    -- plans it on every call: it is kept to a bare insert, cheap to plan.
    for v_ns in select distinct n from unnest(v_namespaces) n loop
        execute format(
            $q$
            with sent as (
                insert into pgmq.%I (vt, message)
                select clock_timestamp(), m from unnest($1, $2) as u(m, ns) where ns = $3
                returning msg_id, message
            )
            select array_agg(sent.message), array_agg(sent.msg_id) from sent
            $q$, pgmq.format_table_name('weft_steps_' || v_ns, 'q'))
        into v_msgs, v_ids
        using v_messages, v_namespaces, v_ns;
        v_sent_messages := v_sent_messages || v_msgs;
        v_sent_ids := v_sent_ids || v_ids;
        perform pg_notify('weft_steps_' || v_ns, '');
    end loop;

    -- The sent messages zipped with their ids drive an index lookup per
    -- step. Every step of the batch is ready (pending or waiting_retry) and
    -- its task locked by the caller; the guard on the state only documents it.
    update weft.steps s
       set state = 'enqueued', attempts = (u.m ->> 'attempt')::integer, enqueued_at = v_now,
           next_attempt_at = null, msg_id = u.id
      from unnest(v_sent_messages, v_sent_ids) as u(m, id)
     where s.id = (u.m ->> 'step_id')::uuid
       and s.state in ('pending', 'waiting_retry');

    insert into weft.step_transitions (task_id, step_id, attempt, from_state, to_state, at)
    select b.task_id, b.step_id, b.attempt, b.prev_state, 'enqueued', v_now
    from unnest(v_task_ids, v_step_ids, v_prev_states, v_attempts) as b(task_id, step_id, prev_state, attempt);

    with started as (
        update weft.tasks t set state = 'running', started_at = v_now, updated_at = v_now
         where t.id = any (v_task_ids) and t.state = 'pending'
        returning t.id
    )
    insert into weft.task_transitions (task_id, from_state, to_state, at)
    select started.id, 'pending', 'running', v_now from started;

    return query
        select (u.m ->> 'task_id')::uuid, (u.m ->> 'step_id')::uuid, u.id, u.m -> 'trace'
        from unnest(v_sent_messages, v_sent_ids) as u(m, id);
end
$$;

-- As in 20261128000600_cached_plans.sql: the ready steps of the given tasks
-- (a task with a permanent failure runs nothing more unless it continues on
-- failure or the step is forced), sent by weft.enqueue_steps.
create or replace function weft.enqueue_ready_steps(
    p_task_ids uuid[],
    p_now timestamptz default null,
    p_force uuid[] default '{}'
)
returns table (task_id uuid, step_id uuid, msg_id bigint, trace jsonb)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
declare
    -- The clock, not the transaction start: the caller may have waited for
    -- task locks, and history must never show a step enqueued before its
    -- dependencies completed.
    v_now timestamptz := coalesce(p_now, clock_timestamp());
    v_ready uuid[];
begin
    with readiness as (
        select * from weft.step_readiness(p_task_ids, v_now)
    ),
    blocked as (
        select r.task_id from readiness r group by r.task_id having bool_or(r.failed)
    )
    select array_agg(r.step_id)
      into v_ready
      from readiness r
      join weft.tasks t on t.id = r.task_id
     where r.ready
       and (t.on_failure = 'continue' or r.task_id not in (select b.task_id from blocked b)
            or r.step_id = any (p_force));
    if v_ready is null then
        return;
    end if;
    return query select * from weft.enqueue_steps(v_ready, v_now);
end
$$;

-- As in 20261128000600_cached_plans.sql, with the roots enqueued directly.
create or replace function weft.create_tasks(
    p_namespace text,
    p_on_failure text,
    p_task_ids uuid[],
    p_template_ids bigint[],
    p_inputs jsonb[],
    p_priorities integer[],
    p_key_hashes text[],
    p_request_hashes text[],
    p_traces jsonb[],
    p_step_ids uuid[],
    p_step_tasks uuid[],
    p_positions integer[],
    p_names text[],
    p_handlers text[],
    p_configs jsonb[],
    p_max_attempts integer[],
    p_timeouts integer[],
    p_backoff_initials integer[],
    p_backoff_maxes integer[],
    p_backoff_multipliers double precision[],
    p_backoff_jitters text[],
    p_edge_tasks uuid[],
    p_edge_steps uuid[],
    p_edge_deps uuid[]
)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
declare
    v_inserted uuid[];
    v_all boolean;
    v_enqueued jsonb;
begin
    with ins as (
        insert into weft.tasks (id, template_id, namespace, on_failure, input, priority,
                                idempotency_key_hash, request_hash, trace_context)
        select t.id, t.template_id, p_namespace, p_on_failure, t.input, t.priority,
               t.key_hash, t.request_hash, t.trace
        from unnest(p_task_ids, p_template_ids, p_inputs, p_priorities, p_key_hashes,
                    p_request_hashes, p_traces)
             as t(id, template_id, input, priority, key_hash, request_hash, trace)
        on conflict (namespace, idempotency_key_hash) where idempotency_key_hash is not null
        do nothing
        returning id
    )
    select coalesce(array_agg(ins.id), '{}') into v_inserted from ins;
    if cardinality(v_inserted) = 0 then
        return jsonb_build_object('inserted', '[]'::jsonb, 'enqueued', '[]'::jsonb);
    end if;
    v_all := cardinality(v_inserted) = cardinality(p_task_ids);

    insert into weft.steps (id, task_id, position, name, handler, config, max_attempts, timeout_ms,
                            backoff_initial_ms, backoff_max_ms, backoff_multiplier, backoff_jitter)
    select s.*
    from unnest(p_step_ids, p_step_tasks, p_positions, p_names, p_handlers, p_configs,
                p_max_attempts, p_timeouts, p_backoff_initials, p_backoff_maxes,
                p_backoff_multipliers, p_backoff_jitters)
         as s(id, task_id, position, name, handler, config, max_attempts, timeout_ms,
              backoff_initial_ms, backoff_max_ms, backoff_multiplier, backoff_jitter)
    -- `in` over an unnest is a hashed subplan: linear in the batch.
    where v_all or s.task_id in (select unnest(v_inserted));

    insert into weft.step_edges (task_id, step_id, depends_on)
    select e.task_id, e.step_id, e.depends_on
    from unnest(p_edge_tasks, p_edge_steps, p_edge_deps) as e(task_id, step_id, depends_on)
    where v_all or e.task_id in (select unnest(v_inserted));

    insert into weft.task_transitions (task_id, from_state, to_state, reason)
    select id, null, 'pending', 'created' from unnest(v_inserted) as t(id);

    -- The roots: steps no edge gives a dependency.
    select coalesce(jsonb_agg(jsonb_build_object(
               'task_id', e.task_id, 'step_id', e.step_id, 'msg_id', e.msg_id, 'trace', e.trace)), '[]')
      into v_enqueued
      from weft.enqueue_steps(array(
               select s.id from unnest(p_step_ids, p_step_tasks) as s(id, task_id)
                where s.id not in (select unnest(p_edge_steps))
                  and (v_all or s.task_id in (select unnest(v_inserted)))),
               clock_timestamp()) e;

    return jsonb_build_object('inserted', to_jsonb(v_inserted), 'enqueued', v_enqueued);
end
$$;
