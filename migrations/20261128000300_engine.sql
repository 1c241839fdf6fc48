-- The engine's transitions, as set-based functions over many tasks at once:
-- enqueue what is ready (the transactional outbox), apply worker results
-- under a per-task row lock with fencing, finalize tasks, and claim due
-- retries. Callers compose them in one transaction per batch.

-- Enqueues every ready step of the given tasks: moves each to `enqueued`
-- (attempt + 1), writes its message to its namespace's step queue and records
-- the transition, all in the caller's transaction. Under `fail_fast` a task
-- blocked by failures gets nothing new; under `continue` its independent
-- branches still run. Steps in p_force (an operator's explicit retry) run
-- even when their task is blocked. The caller must hold the tasks' row locks.
create function weft.enqueue_ready_steps(
    p_task_ids uuid[],
    p_now timestamptz default null,
    p_force uuid[] default '{}'
)
returns table (task_id uuid, step_id uuid, msg_id bigint, trace jsonb)
language plpgsql as $$
declare
    -- The clock, not the transaction start: the caller may have waited for
    -- task locks, and history must never show a step enqueued before its
    -- dependencies completed.
    v_now timestamptz := coalesce(p_now, clock_timestamp());
    v_ns text;
    -- The batch, as parallel arrays (no temporary table: no catalog churn per call).
    v_task_ids uuid[];
    v_step_ids uuid[];
    v_namespaces text[];
    v_prev_states text[];
    v_attempts integer[];
    v_messages jsonb[];
    v_sent_steps uuid[] := '{}';
    v_sent_ids bigint[] := '{}';
    v_steps uuid[];
    v_ids bigint[];
begin
    with readiness as (
        select * from weft.step_readiness(p_task_ids, v_now)
    ),
    blocked as (
        select r.task_id from readiness r group by r.task_id having bool_or(r.failed)
    ),
    batch as (
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
        from readiness r
        join weft.steps s on s.id = r.step_id
        join weft.tasks t on t.id = r.task_id
        where r.ready
          and t.state in ('pending', 'running')
          and (t.on_failure = 'continue' or r.task_id not in (select b.task_id from blocked b)
               or r.step_id = any (p_force))
        order by s.task_id, s.position
    )
    select array_agg(b.task_id), array_agg(b.id), array_agg(b.namespace), array_agg(b.state),
           array_agg(b.attempt), array_agg(b.message)
      into v_task_ids, v_step_ids, v_namespaces, v_prev_states, v_attempts, v_messages
      from batch b;

    if v_step_ids is null then
        return;
    end if;

    -- One insert per namespace straight into its pgmq queue table, so the
    -- message ids come back paired with their steps.
    for v_ns in select distinct n from unnest(v_namespaces) n loop
        execute format(
            $q$
            with sent as (
                insert into pgmq.%I (vt, message)
                select clock_timestamp(), m from unnest($1, $2) as u(m, ns) where ns = $3
                returning msg_id, (message ->> 'step_id')::uuid as step_id
            )
            select array_agg(step_id), array_agg(msg_id) from sent
            $q$, pgmq.format_table_name('weft_steps_' || v_ns, 'q'))
        into v_steps, v_ids
        using v_messages, v_namespaces, v_ns;
        v_sent_steps := v_sent_steps || v_steps;
        v_sent_ids := v_sent_ids || v_ids;
        perform pg_notify('weft_steps_' || v_ns, '');
    end loop;

    update weft.steps s
       set state = 'enqueued', attempts = b.attempt, enqueued_at = v_now,
           next_attempt_at = null, msg_id = sent.msg_id
      from unnest(v_step_ids, v_prev_states, v_attempts) as b(step_id, prev_state, attempt)
      join unnest(v_sent_steps, v_sent_ids) as sent(step_id, msg_id) on sent.step_id = b.step_id
     where s.id = b.step_id and s.state = b.prev_state;

    insert into weft.step_transitions (task_id, step_id, attempt, from_state, to_state, at)
    select b.task_id, b.step_id, b.attempt, b.prev_state, 'enqueued', v_now
    from unnest(v_task_ids, v_step_ids, v_prev_states, v_attempts) as b(task_id, step_id, prev_state, attempt);

    with started as (
        update weft.tasks t set state = 'running', started_at = v_now, updated_at = v_now
         where t.id in (select distinct id from unnest(v_task_ids) as ids(id)) and t.state = 'pending'
        returning t.id
    )
    insert into weft.task_transitions (task_id, from_state, to_state, at)
    select started.id, 'pending', 'running', v_now from started;

    return query
        select b.task_id, b.step_id, sent.msg_id, m -> 'trace'
        from unnest(v_task_ids, v_step_ids, v_messages) as b(task_id, step_id, m)
        join unnest(v_sent_steps, v_sent_ids) as sent(step_id, msg_id) on sent.step_id = b.step_id;
end
$$;

-- Moves tasks whose steps decide their end to a final state: `complete` when
-- every step is complete or resolved; `error` when blocked by failures and
-- nothing is in flight (under `continue`: and nothing can still run).
-- Returns every given task with its state and execution status.
create function weft.finalize_tasks(p_task_ids uuid[], p_now timestamptz default null)
returns table (task_id uuid, state text, execution_status text, finalized boolean)
language sql as $$
    with clock as materialized (
        select coalesce(p_now, clock_timestamp()) as now
    ),
    ctx as (
        select * from weft.task_execution_context(p_task_ids, (select now from clock))
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
           set state = d.to_state, finished_at = (select now from clock),
               started_at = coalesce(t.started_at, (select now from clock)),
               updated_at = (select now from clock)
          from decided d
         where t.id = d.task_id and d.to_state is not null and t.state = d.from_state
        returning t.id, d.from_state, d.to_state
    ),
    recorded as (
        insert into weft.task_transitions (task_id, from_state, to_state, reason, at)
        select m.id, m.from_state, m.to_state,
               case m.to_state when 'error' then 'blocked_by_failures' end, (select now from clock)
        from moved m
        returning task_id
    )
    select c.task_id, coalesce(m.to_state, t.state), c.execution_status, m.id is not null
    from ctx c
    join weft.tasks t on t.id = c.task_id
    left join moved m on m.id = c.task_id
$$;

-- Results that fencing dropped (late, duplicate, or for a withdrawn step),
-- kept so an operator sees them in the step's history.
create table weft.stale_results (
    id bigint generated always as identity primary key,
    task_id uuid not null,
    step_id uuid not null,
    attempt integer not null,
    -- The step's state and attempt when the result arrived (null: no such step).
    step_state text,
    step_attempt integer,
    result jsonb not null,
    at timestamptz not null default now()
);
create index stale_results_by_step on weft.stale_results (step_id, id);
create index stale_results_by_task on weft.stale_results (task_id);

-- Applies a batch of worker results. Each element of p_results is
--   {task_id, step_id, attempt, status: success|retryable|permanent,
--    output?, error?: {message, reason}, retry_after_ms?}
-- Locks the batch's tasks in id order (so two collectors never deadlock and
-- work on one task is serialized), then applies each result only if its step
-- is still `enqueued` at exactly that attempt: the fencing token. Anything
-- else is stale and reported as such, never applied.
create function weft.apply_results(p_results jsonb, p_now timestamptz default null)
returns table (step_id uuid, attempt integer, outcome text)
language plpgsql as $$
declare
    v_now timestamptz;
    r record;
    s weft.steps%rowtype;
    v_to text;
    v_delay bigint;
    v_error jsonb;
    v_any_retry boolean := false;
begin
    perform 1 from weft.tasks t
     where t.id in (select (x ->> 'task_id')::uuid from jsonb_array_elements(p_results) x)
     order by t.id
     for update;
    -- Read the clock once the locks are held (see enqueue_ready_steps).
    v_now := coalesce(p_now, clock_timestamp());

    for r in
        select * from jsonb_to_recordset(p_results) as x(
            task_id uuid, step_id uuid, attempt integer, status text,
            output jsonb, error jsonb, retry_after_ms bigint)
    loop
        select * into s from weft.steps where id = r.step_id and task_id = r.task_id;
        if not found or s.state <> 'enqueued' or s.attempts <> r.attempt then
            -- Fenced off: acknowledged, recorded for operators, never applied.
            insert into weft.stale_results (task_id, step_id, attempt, step_state, step_attempt, result, at)
            values (r.task_id, r.step_id, r.attempt, s.state, s.attempts,
                    jsonb_build_object('status', r.status, 'error', r.error), v_now);
            step_id := r.step_id; attempt := r.attempt; outcome := 'stale';
            return next;
            continue;
        end if;

        v_error := case when r.error is null then null
                        else r.error || jsonb_build_object('attempt', r.attempt, 'at', v_now) end;
        if r.status = 'success' then
            v_to := 'complete';
            update weft.steps
               set state = 'complete', output = r.output, finished_at = v_now, msg_id = null
             where id = s.id;
        elsif r.status = 'retryable' and s.retryable and s.attempts - s.attempt_floor < s.max_attempts then
            v_to := 'waiting_retry';
            v_delay := weft.retry_delay_ms(s.attempts - s.attempt_floor, s.backoff_initial_ms,
                                           s.backoff_max_ms, s.backoff_multiplier, s.backoff_jitter,
                                           r.retry_after_ms, random());
            update weft.steps
               set state = 'waiting_retry', last_error = v_error, msg_id = null,
                   next_attempt_at = v_now + make_interval(secs => v_delay / 1000.0)
             where id = s.id;
            v_any_retry := true;
        else
            v_to := 'error';
            if r.status = 'retryable' then
                v_error := v_error || jsonb_build_object('retries_exhausted', true);
            end if;
            update weft.steps
               set state = 'error', last_error = v_error, finished_at = v_now, msg_id = null,
                   retryable = (r.status = 'retryable')
             where id = s.id;
        end if;

        insert into weft.step_transitions (task_id, step_id, attempt, from_state, to_state, reason, detail, at)
        values (s.task_id, s.id, r.attempt, 'enqueued', v_to,
                case r.status when 'success' then 'success'
                              else coalesce(r.error ->> 'reason', r.status) end,
                v_error, v_now);

        step_id := r.step_id; attempt := r.attempt; outcome := v_to;
        return next;
    end loop;

    -- Wake the retry schedulers: the earliest due time may have moved.
    if v_any_retry then
        perform pg_notify('weft_retries', '');
    end if;
end
$$;

-- Steps eligible to run again once due, of tasks that may still enqueue them.
create function weft.pending_retries()
returns table (task_id uuid, step_id uuid, next_attempt_at timestamptz)
language sql stable as $$
    select s.task_id, s.id, s.next_attempt_at
    from weft.steps s
    join weft.tasks t on t.id = s.task_id
    where s.state = 'waiting_retry'
      and s.retryable and s.attempts - s.attempt_floor < s.max_attempts
      and t.state in ('pending', 'running')
      and (t.on_failure = 'continue'
           or not exists (select 1 from weft.steps f
                          where f.task_id = s.task_id and f.state in ('error', 'cancelled')))
$$;

-- Locks up to p_limit tasks that have a retry due at p_now, skipping tasks
-- another orchestrator holds (it re-evaluates them itself).
create function weft.claim_due_retry_tasks(p_now timestamptz, p_limit integer)
returns table (task_id uuid)
language sql as $$
    select t.id from weft.tasks t
    where t.id in (select p.task_id from weft.pending_retries() p where p.next_attempt_at <= p_now)
      and t.state in ('pending', 'running')
    order by t.id
    limit p_limit
    for update skip locked
$$;

-- When the next retry is due, for the scheduler's timer.
create function weft.next_retry_at()
returns timestamptz language sql stable as $$
    select min(p.next_attempt_at) from weft.pending_retries() p
$$;

-- Depth, in-flight count and oldest message age of every Weft queue: the one
-- query behind `weft queue stats`, GET /v1/queues, the queue metrics and the
-- documented KEDA trigger.
create function weft.queue_stats()
returns table (queue_name text, depth bigint, in_flight bigint, oldest_age_secs double precision)
language plpgsql stable as $$
declare
    v_queue text;
begin
    for v_queue in
        select m.queue_name from pgmq.meta m where m.queue_name like 'weft\_%' order by 1
    loop
        return query execute format(
            $q$
            select %L::text,
                   count(*) filter (where vt <= clock_timestamp()),
                   count(*) filter (where vt > clock_timestamp() and read_ct > 0),
                   coalesce(extract(epoch from clock_timestamp() - min(enqueued_at)), 0)::float8
            from pgmq.%I
            $q$, v_queue, pgmq.format_table_name(v_queue, 'q'));
    end loop;
end
$$;

-- Result messages that cannot be decoded are moved here with the reason,
-- never dropped. (Namespaces' dead-letter queues are weft_dlq_<namespace>.)
select pgmq.create('weft_results_dlq');
