-- Sending step messages planned a statement on every call. Each namespace
-- has its own pgmq queue table, so weft.create_tasks and weft.enqueue_steps
-- built the insert with `execute format(...)`, and PL/pgSQL plans an
-- EXECUTE'd statement every time it runs. Measured (pgbench, one client,
-- creating a one-step task, six pairs alternating): 0.89 to 1.12 ms per
-- call with the dynamic insert, 0.76 to 0.91 ms with the same insert
-- written statically, about 0.18 ms less on the critical path of every
-- task and of every result batch that enqueues a step.
--
-- So the sending is now one function, weft.send_steps, whose body is
-- generated from the namespaces: one static insert per namespace, each
-- planned once per session and cached like every other statement of the
-- engine. weft.ensure_namespace regenerates it when it registers a
-- namespace. A namespace the body does not name (registered by a
-- transaction that committed while this session used the previous body)
-- takes the dynamic insert, so a stale body is slower, never wrong.

-- Writes weft.send_steps for the namespaces registered now. Serialized by
-- an advisory lock: two transactions replacing one function at once would
-- otherwise fail with "tuple concurrently updated", and the second, waiting
-- for the first to commit, then reads its namespace too.
create function weft.generate_send_steps()
returns void
language plpgsql
set jit = off
as $gen$
declare
    v_branches text := '';
    v_ns text;
begin
    perform pg_advisory_xact_lock(hashtext('weft.generate_send_steps'));
    for v_ns in select n.name from weft.namespaces n order by n.name loop
        v_branches := v_branches || format(
            $b$
    if p_namespace = %L then
        return query
            insert into pgmq.%I as q (vt, message)
            select clock_timestamp(), m from unnest(p_messages) as m
            returning q.msg_id, q.message;
        return;
    end if;$b$,
            v_ns, pgmq.format_table_name('weft_steps_' || v_ns, 'q'));
    end loop;

    execute format(
        $f$
create or replace function weft.send_steps(p_namespace text, p_messages jsonb[])
returns table (msg_id bigint, message jsonb)
language plpgsql
set plan_cache_mode = force_generic_plan
set jit = off
as $body$
begin%s
    return query execute format(
        'insert into pgmq.%%I as q (vt, message)
         select clock_timestamp(), m from unnest($1) as m
         returning q.msg_id, q.message',
        pgmq.format_table_name('weft_steps_' || p_namespace, 'q'))
    using p_messages;
end
$body$
        $f$, v_branches);
end
$gen$;

-- Inserts step messages into the namespace's step queue, in order, and
-- returns each with its msg_id. Generated: see weft.generate_send_steps.
select weft.generate_send_steps();

-- As in 20261128000100_weft_schema.sql, and regenerates weft.send_steps.
create or replace function weft.ensure_namespace(p_name text)
returns void
language plpgsql
set jit = off
as $$
begin
    insert into weft.namespaces (name) values (p_name) on conflict do nothing;
    if found then
        perform pgmq.create('weft_steps_' || p_name);
        perform pgmq.create('weft_dlq_' || p_name);
        perform weft.generate_send_steps();
    end if;
end
$$;

-- As in 20261129000500_create_in_final_state.sql, sending with weft.send_steps.
create or replace function weft.enqueue_steps(p_step_ids uuid[], p_now timestamptz)
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
               weft.step_message(
                   s.task_id, s.id, s.name, t.namespace, s.handler, s.attempts + 1,
                   s.config, t.input,
                   coalesce((
                       select jsonb_object_agg(dep.name, coalesce(dep.output, 'null'::jsonb))
                       from weft.step_edges e join weft.steps dep on dep.id = e.depends_on
                       where e.step_id = s.id), '{}'::jsonb),
                   s.timeout_ms, v_now, t.trace_context) as message
        from weft.steps s
        -- The task per step, by key (see 20261129000200).
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

    -- One insert per namespace into its pgmq queue table.
    for v_ns in select distinct n from unnest(v_namespaces) n loop
        select array_agg(sent.message), array_agg(sent.msg_id)
          into v_msgs, v_ids
          from weft.send_steps(v_ns, array(select u.m from unnest(v_messages, v_namespaces) as u(m, ns)
                                            where u.ns = v_ns)) sent;
        v_sent_messages := v_sent_messages || v_msgs;
        v_sent_ids := v_sent_ids || v_ids;
        perform pg_notify('weft_steps_' || v_ns, '');
    end loop;

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

-- As in 20261129000500_create_in_final_state.sql, sending with weft.send_steps.
create or replace function weft.create_tasks(
    p_namespace text,
    p_on_failure text,
    p_latest boolean,
    p_task_ids uuid[],
    p_template_ids bigint[],
    p_inputs jsonb[],
    p_priorities integer[],
    p_key_hashes text[],
    p_request_hashes text[],
    p_traces jsonb[],
    p_step_ids uuid[],
    p_step_tasks uuid[],
    p_step_task_idx integer[],
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
    -- The clock, as weft.enqueue_steps: history orders by it.
    v_now timestamptz := clock_timestamp();
    v_inserted uuid[];
    v_all boolean;
    v_roots jsonb[];
    v_enqueued jsonb;
    v_msg_ids jsonb;
begin
    if p_latest and exists (
        select 1
          from weft.templates t
          join weft.templates newer
            on newer.namespace = t.namespace and newer.name = t.name and newer.version > t.version
         where t.id = p_template_ids[1])
    then
        return jsonb_build_object('stale', true);
    end if;

    with ins as (
        insert into weft.tasks (id, template_id, namespace, state, on_failure, input, priority,
                                idempotency_key_hash, request_hash, trace_context, started_at)
        select t.id, t.template_id, p_namespace, 'running', p_on_failure, t.input, t.priority,
               t.key_hash, t.request_hash, t.trace, v_now
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

    -- The roots (steps no edge gives a dependency) of the inserted tasks,
    -- as their first attempt's messages. Every template has one at least
    -- (its steps form a DAG), so every task inserted above runs.
    v_roots := array(
        select weft.step_message(s.task_id, s.id, s.name, p_namespace, s.handler, 1, s.config,
                                 p_inputs[s.idx], '{}'::jsonb, s.timeout_ms, v_now,
                                 p_traces[s.idx])
          from unnest(p_step_ids, p_step_tasks, p_step_task_idx, p_names, p_handlers,
                      p_configs, p_timeouts)
               as s(id, task_id, idx, name, handler, config, timeout_ms)
         -- `in` over an unnest is a hashed subplan: linear in the batch.
         where s.id not in (select unnest(p_edge_steps))
           and (v_all or s.task_id in (select unnest(v_inserted))));
    if cardinality(v_roots) = 0 then
        raise exception 'weft.create_tasks: no root step among the tasks inserted';
    end if;

    select jsonb_agg(jsonb_build_object(
               'task_id', sent.message -> 'task_id', 'step_id', sent.message -> 'step_id',
               'msg_id', sent.msg_id, 'trace', sent.message -> 'trace')),
           jsonb_object_agg(sent.message ->> 'step_id', sent.msg_id)
      into v_enqueued, v_msg_ids
      from weft.send_steps(p_namespace, v_roots) sent;
    perform pg_notify('weft_steps_' || p_namespace, '');

    insert into weft.steps (id, task_id, position, name, handler, config, max_attempts, timeout_ms,
                            backoff_initial_ms, backoff_max_ms, backoff_multiplier, backoff_jitter,
                            state, attempts, enqueued_at, msg_id)
    select s.id, s.task_id, s.position, s.name, s.handler, s.config, s.max_attempts, s.timeout_ms,
           s.backoff_initial_ms, s.backoff_max_ms, s.backoff_multiplier, s.backoff_jitter,
           case when m.msg_id is null then 'pending' else 'enqueued' end,
           case when m.msg_id is null then 0 else 1 end,
           case when m.msg_id is null then null else v_now end,
           m.msg_id
    from unnest(p_step_ids, p_step_tasks, p_positions, p_names, p_handlers, p_configs,
                p_max_attempts, p_timeouts, p_backoff_initials, p_backoff_maxes,
                p_backoff_multipliers, p_backoff_jitters)
         as s(id, task_id, position, name, handler, config, max_attempts, timeout_ms,
              backoff_initial_ms, backoff_max_ms, backoff_multiplier, backoff_jitter)
    cross join lateral (select (v_msg_ids ->> s.id::text)::bigint as msg_id) m
    where v_all or s.task_id in (select unnest(v_inserted));

    insert into weft.step_edges (task_id, step_id, depends_on)
    select e.task_id, e.step_id, e.depends_on
    from unnest(p_edge_tasks, p_edge_steps, p_edge_deps) as e(task_id, step_id, depends_on)
    where v_all or e.task_id in (select unnest(v_inserted));

    insert into weft.step_transitions (task_id, step_id, attempt, from_state, to_state, at)
    select (e ->> 'task_id')::uuid, (e ->> 'step_id')::uuid, 1, 'pending', 'enqueued', v_now
    from jsonb_array_elements(v_enqueued) e;

    -- Created, then started when its roots were sent: the same history as
    -- a task enqueued after its creation, in order.
    insert into weft.task_transitions (task_id, from_state, to_state, reason, at)
    select t.id, h.from_state, h.to_state, h.reason, h.at
    from unnest(v_inserted) as t(id)
    cross join (values (1, null, 'pending', 'created', now()),
                       (2, 'pending', 'running', null, v_now))
               as h(ord, from_state, to_state, reason, at)
    order by t.id, h.ord;

    return jsonb_build_object('inserted', to_jsonb(v_inserted), 'enqueued', v_enqueued);
end
$$;
