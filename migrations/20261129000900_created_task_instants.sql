-- `POST /v1/tasks` answers with the task it created, as `GET` shows it.
-- It read that view back inside the creating statement
-- (`weft.create_task_viewed`: the task's execution context and its steps'
-- readiness, two more statements over the rows just written), about 0.13 ms
-- of a one-step task's 0.78 and 0.36 ms of a four-step task's creation,
-- every one of them on the path to the root's start. Everything in that
-- view is known to the orchestrator that wrote it but the two instants the
-- statement took: when the task was created (the transaction's `now()`, the
-- column's default) and when it started and its roots were enqueued
-- (`v_now`). weft.create_tasks now returns them, and the orchestrator
-- builds the view (tests/it/api.rs compares it with `GET`).
-- weft.create_task_viewed stays for orchestrators of the previous build
-- during a rolling upgrade.

-- As in 20261129000700_static_step_senders.sql, also returning
-- {created_at, at}.
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

    return jsonb_build_object('inserted', to_jsonb(v_inserted), 'enqueued', v_enqueued,
                              'created_at', now(), 'at', v_now);
end
$$;
