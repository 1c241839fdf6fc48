-- Cached plans on the hot path. Planning the status model's queries costs
-- 1-2 ms, executing them 0.1-0.3 ms for a batch of a few tasks, so a hop
-- that plans its queries on every call spends most of its time planning.
--
-- * SQL-language functions that cannot be inlined (data-modifying CTEs,
--   FOR UPDATE, aggregates) are planned on every call in PostgreSQL 15, so
--   the engine's become PL/pgSQL, whose statements keep their plans per
--   connection.
-- * PL/pgSQL picks custom plans (replanned per call) while they look cheaper
--   than the generic one, and with array parameters they always do. The hot
--   functions force the generic plan: it is planned once per connection, and
--   it does not swing to a different join strategy when a batch is large.
-- * A generic plan is kept for the life of the connection, so one made while
--   the tables were small (a fresh install, the first minute of a burst,
--   before autovacuum analyzes) would keep its sequential scans as the tables
--   grow: measured, a batch of 375 tasks then took 16 s instead of a few ms,
--   because the readiness subquery scanned every step once per step. Every
--   lookup on the hot path is by key on a small set of tasks, so the hot
--   functions rule out sequential scans, hash and merge joins: their plans are
--   index lookups in nested loops whatever the statistics say. Without hash
--   joins, a join between two in-memory sets (arrays, CTEs) would be a nested
--   loop, quadratic in the batch, so the functions below never join two
--   such sets: they zip arrays, probe hashed subplans (`not in`) or drive an
--   index lookup from one set.
-- * Membership of table rows in a batch is `id = any (array)`, never
--   `id in (subquery)`: the latter becomes a join, and under a generic plan
--   with stale statistics ("one pending task") PostgreSQL walked every
--   active task and re-ran the subquery for each (W5, after a stall: 870
--   tasks × 436 ids, 378,015 comparisons, 0.5 s for one update). `= any`
--   is an index condition: one btree descent per id, whatever the estimate.

-- As in 20261128000300_engine.sql, but the steps are moved to `enqueued`
-- from the sent messages zipped with their ids (no join of two lists), and
-- the result is read back from them.
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
as $$
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
    v_sent_messages jsonb[] := '{}';
    v_sent_ids bigint[] := '{}';
    v_msgs jsonb[];
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


-- As in 20261128000300_engine.sql, set-based: one update, one insert of
-- transitions and one of stale results for the whole batch instead of a
-- loop of statements per result (0.4 ms per result, measured). Fencing is
-- unchanged: a result applies only if its step is still `enqueued` at
-- exactly its attempt, and of duplicates in one batch only the first.
create or replace function weft.apply_results(p_results jsonb, p_now timestamptz default null)
returns table (step_id uuid, attempt integer, outcome text)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
#variable_conflict use_column
declare
    v_now timestamptz;
begin
    perform 1 from weft.tasks t
     where t.id = any (array(select (x ->> 'task_id')::uuid from jsonb_array_elements(p_results) x))
     order by t.id
     for update;
    -- Read the clock once the locks are held (see enqueue_ready_steps).
    v_now := coalesce(p_now, clock_timestamp());

    -- Any retryable result may schedule a retry: wake the retry schedulers,
    -- whose earliest due time may have moved (a spurious wake-up is harmless).
    if exists (select 1 from jsonb_array_elements(p_results) x where x ->> 'status' = 'retryable') then
        perform pg_notify('weft_retries', '');
    end if;

    return query
    with r as (
        select *
        from rows from (jsonb_to_recordset(p_results) as (
                 task_id uuid, step_id uuid, attempt integer, status text,
                 output jsonb, error jsonb, retry_after_ms bigint))
             with ordinality as x(task_id, step_id, attempt, status, output, error,
                                  retry_after_ms, ord)
    ),
    judged as (
        select r.*, s.state as step_state, s.attempts as step_attempt,
               coalesce(s.state = 'enqueued' and s.attempts = r.attempt, false)
                   and r.ord = min(r.ord) over (partition by r.step_id, r.attempt) as fresh,
               case
                   when r.status = 'success' then 'complete'
                   when r.status = 'retryable' and s.retryable
                        and s.attempts - s.attempt_floor < s.max_attempts then 'waiting_retry'
                   else 'error'
               end as to_state,
               case
                   when r.status = 'retryable' and s.retryable
                        and s.attempts - s.attempt_floor < s.max_attempts
                   then weft.retry_delay_ms(s.attempts - s.attempt_floor, s.backoff_initial_ms,
                                            s.backoff_max_ms, s.backoff_multiplier,
                                            s.backoff_jitter, r.retry_after_ms, random())
               end as delay_ms
        from r
        left join weft.steps s on s.id = r.step_id and s.task_id = r.task_id
    ),
    decided as (
        select j.*,
               case when j.error is not null then
                   j.error || jsonb_build_object('attempt', j.attempt, 'at', v_now)
                   || case when j.status = 'retryable' and j.to_state = 'error'
                           then jsonb_build_object('retries_exhausted', true)
                           else '{}'::jsonb end
               end as detail,
               -- What a later duplicate of an applied result finds: the
               -- state the earlier one left (as a row-by-row loop would).
               max(case when j.fresh then j.to_state end)
                   over (partition by j.step_id order by j.ord
                         rows between unbounded preceding and 1 preceding) as state_before
        from judged j
    ),
    applied as (
        update weft.steps s
           set state = d.to_state,
               output = case when d.to_state = 'complete' then d.output else s.output end,
               last_error = case when d.to_state = 'complete' then s.last_error else d.detail end,
               finished_at = case when d.to_state = 'waiting_retry' then s.finished_at else v_now end,
               next_attempt_at = case when d.to_state = 'waiting_retry'
                                      then v_now + make_interval(secs => d.delay_ms / 1000.0)
                                      else s.next_attempt_at end,
               msg_id = null,
               retryable = case when d.to_state = 'error' then d.status = 'retryable'
                                else s.retryable end
          from decided d
         where d.fresh and s.id = d.step_id
    ),
    recorded as (
        insert into weft.step_transitions (task_id, step_id, attempt, from_state, to_state,
                                           reason, detail, at)
        select d.task_id, d.step_id, d.attempt, 'enqueued', d.to_state,
               case d.status when 'success' then 'success'
                             else coalesce(d.error ->> 'reason', d.status) end,
               d.detail, v_now
        from decided d
        where d.fresh
    ),
    -- Fenced off: acknowledged, recorded for operators, never applied.
    fenced as (
        insert into weft.stale_results (task_id, step_id, attempt, step_state, step_attempt,
                                        result, at)
        select d.task_id, d.step_id, d.attempt, coalesce(d.state_before, d.step_state),
               d.step_attempt, jsonb_build_object('status', d.status, 'error', d.error), v_now
        from decided d
        where not d.fresh
    )
    select d.step_id, d.attempt, case when d.fresh then d.to_state else 'stale' end
    from decided d
    order by d.ord;
end
$$;

create or replace function weft.finalize_tasks(p_task_ids uuid[], p_now timestamptz default null)
returns table (task_id uuid, state text, execution_status text, finalized boolean)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
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
        from ctx c join weft.tasks t on t.id = c.task_id
        where t.state in ('pending', 'running')
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

create or replace function weft.claim_due_retry_tasks(p_now timestamptz, p_limit integer)
returns table (task_id uuid)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
#variable_conflict use_column
begin
    return query
    select t.id from weft.tasks t
    where t.id = any (array(select p.task_id from weft.pending_retries() p
                            where p.next_attempt_at <= p_now))
      and t.state in ('pending', 'running')
    order by t.id
    limit p_limit
    for update skip locked;
end
$$;

create or replace function weft.next_retry_at()
returns timestamptz
language plpgsql stable
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
begin
    return (select min(p.next_attempt_at) from weft.pending_retries() p);
end
$$;

-- What follows a batch of results or of due retries: enqueue the ready
-- steps of the given tasks (their row locks held by the caller) and finalize
-- those of them that got nothing enqueued (finalize_tasks needs no enqueued
-- step to move a task, so a task with a step just enqueued cannot be
-- finished). Returns {enqueued: [{task_id, step_id, msg_id, trace}],
-- finalized: [{task_id, state, execution_status, finalized}]}.
create function weft.advance_tasks(p_task_ids uuid[])
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
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

    v_idle := array(select t from unnest(p_task_ids) t
                     where t not in (select b from unnest(v_busy) b));
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

-- One retry-scheduler iteration in one statement (one round trip, one
-- implicit transaction): claim up to p_limit tasks with a retry due, advance
-- them (above), and say when the next retry falls due. Returns {claimed,
-- enqueued, finalized (as advance_tasks), next_due_in_s: seconds (negative
-- when overdue, e.g. held by another orchestrator) or null when none is
-- waiting}.
create function weft.dispatch_due_retries(p_limit integer)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
declare
    v_task_ids uuid[];
    v_advanced jsonb := '{"enqueued": [], "finalized": []}';
begin
    v_task_ids := array(select c.task_id
                          from weft.claim_due_retry_tasks(clock_timestamp(), p_limit) c);
    if cardinality(v_task_ids) > 0 then
        v_advanced := weft.advance_tasks(v_task_ids);
    end if;
    return v_advanced || jsonb_build_object(
        'claimed', cardinality(v_task_ids),
        'next_due_in_s', extract(epoch from weft.next_retry_at() - clock_timestamp())::float8);
end
$$;

-- One collector batch in one statement (so one round trip and one implicit
-- transaction): apply the decoded results, advance the touched tasks (above)
-- and delete the result messages. Returns what happened, as {applied:
-- [{step_id, attempt, outcome}], enqueued, finalized (as advance_tasks)}.
create function weft.collect_results(p_results jsonb, p_msg_ids bigint[])
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
declare
    v_applied jsonb;
    v_task_ids uuid[];
    v_advanced jsonb;
begin
    select coalesce(jsonb_agg(jsonb_build_object(
               'step_id', a.step_id, 'attempt', a.attempt, 'outcome', a.outcome)), '[]')
      into v_applied
      from weft.apply_results(p_results) a;

    v_task_ids := array(select distinct (x ->> 'task_id')::uuid
                          from jsonb_array_elements(p_results) x);
    v_advanced := weft.advance_tasks(v_task_ids);

    delete from pgmq.q_weft_results where msg_id = any (p_msg_ids);

    return v_advanced || jsonb_build_object('applied', v_applied);
end
$$;

-- Task creation in one statement (one round trip, atomic without an
-- explicit transaction): the tasks (skipping any whose idempotency key is
-- taken), their steps, edges and `created` transitions, then their root
-- steps enqueued. Steps and edges arrive as parallel arrays for every task;
-- those of skipped tasks are dropped. Returns {inserted: [task ids],
-- enqueued: [{task_id, step_id, msg_id, trace}]}.
create function weft.create_tasks(
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

    select coalesce(jsonb_agg(jsonb_build_object(
               'task_id', e.task_id, 'step_id', e.step_id, 'msg_id', e.msg_id, 'trace', e.trace)), '[]')
      into v_enqueued
      from weft.enqueue_ready_steps(v_inserted) e;

    return jsonb_build_object('inserted', to_jsonb(v_inserted), 'enqueued', v_enqueued);
end
$$;

-- As in 20261128000200_status_model.sql, but the next retry time comes from
-- the same per-task scan as the counts. The correlated subquery it replaces
-- could be planned as a walk of the due-retries index filtered by task,
-- which reads every waiting retry of every task once per task evaluated.
create or replace function weft.task_execution_context(p_task_ids uuid[], p_now timestamptz default null)
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
                                  and not r.backoff_elapsed)::int as retry_later,
               min(s.next_attempt_at) filter (where s.state = 'waiting_retry') as next_retry_at
        from weft.step_readiness(p_task_ids, p_now) r
        join weft.steps s on s.id = r.step_id
        group by r.task_id
    )
    select c.task_id, c.total, c.pending, c.enqueued, c.waiting_retry, c.complete, c.error,
           c.cancelled, c.resolved, c.ready, c.failed, c.retry_later, c.next_retry_at,
           case
               when c.failed > 0 then 'blocked_by_failures'
               when c.ready > 0 then 'has_ready_steps'
               when c.enqueued > 0 then 'processing'
               when c.complete + c.resolved = c.total then 'all_complete'
               else 'waiting_for_dependencies'
           end
    from counts c
$$;
