-- Operator actions and the invariant checker: cancel a task, retry or
-- resolve a failed step, and `weft check`. Each action is one guarded
-- transition under the task's row lock, reported as applied or not.

-- Cancels a task: its pending, waiting and enqueued steps become cancelled,
-- queued messages are withdrawn (a worker holding one learns it when its
-- lease extension finds the message gone, and cancels the handler), and
-- results that arrive later are stale. Returns the task's state afterwards
-- and whether this call cancelled it.
create function weft.cancel_task(p_task_id uuid, p_reason text default null)
returns table (state text, applied boolean)
language plpgsql as $$
declare
    v_now timestamptz;
    v_state text;
    v_namespace text;
    v_msg_ids bigint[];
begin
    select t.state, t.namespace into v_state, v_namespace from weft.tasks t where t.id = p_task_id for update;
    if not found then
        return;
    end if;
    if v_state in ('complete', 'error', 'cancelled') then
        state := v_state; applied := false;
        return next;
        return;
    end if;
    v_now := clock_timestamp();

    with prev as (
        select s.id, s.state, s.attempts, s.msg_id from weft.steps s
        where s.task_id = p_task_id and s.state in ('pending', 'waiting_retry', 'enqueued')
    ),
    withdrawn as (
        update weft.steps s
           set state = 'cancelled', finished_at = v_now, next_attempt_at = null, msg_id = null
          from prev
         where s.id = prev.id
        returning prev.id, prev.state, prev.attempts, prev.msg_id
    ),
    recorded as (
        insert into weft.step_transitions (task_id, step_id, attempt, from_state, to_state, reason, at)
        select p_task_id, w.id, w.attempts, w.state, 'cancelled', coalesce(p_reason, 'task_cancelled'), v_now
        from withdrawn w
        returning 1
    )
    select array_agg(w.msg_id) filter (where w.msg_id is not null) into v_msg_ids from withdrawn w;

    if v_msg_ids is not null then
        perform pgmq.delete('weft_steps_' || v_namespace, v_msg_ids);
    end if;

    update weft.tasks set state = 'cancelled', finished_at = v_now, updated_at = v_now where id = p_task_id;
    insert into weft.task_transitions (task_id, from_state, to_state, reason, at)
    values (p_task_id, v_state, 'cancelled', coalesce(p_reason, 'cancelled by operator'), v_now);
    state := 'cancelled'; applied := true;
    return next;
end
$$;

-- Gives a failed step a fresh budget of attempts (attempt numbers keep
-- growing, so fencing still holds) and puts its task back to running; the
-- caller then enqueues what is ready. Refused unless the step is `error` and
-- the task is not cancelled.
create function weft.retry_step(p_task_id uuid, p_step_name text)
returns table (step_id uuid, outcome text)
language plpgsql as $$
declare
    v_now timestamptz;
    v_task_state text;
    s weft.steps%rowtype;
begin
    select t.state into v_task_state from weft.tasks t where t.id = p_task_id for update;
    if not found then
        outcome := 'task_not_found';
        return next;
        return;
    end if;
    select * into s from weft.steps where task_id = p_task_id and name = p_step_name;
    if not found then
        outcome := 'step_not_found';
        return next;
        return;
    end if;
    step_id := s.id;
    if v_task_state = 'cancelled' then
        outcome := 'task_cancelled';
        return next;
        return;
    end if;
    if s.state <> 'error' then
        outcome := 'not_failed';
        return next;
        return;
    end if;
    v_now := clock_timestamp();
    update weft.steps
       set state = 'pending', attempt_floor = attempts, retryable = true, finished_at = null, msg_id = null
     where id = s.id and state = 'error';
    insert into weft.step_transitions (task_id, step_id, attempt, from_state, to_state, reason, at)
    values (p_task_id, s.id, s.attempts, 'error', 'pending', 'operator_retry', v_now);
    perform weft.reopen_task(p_task_id, v_task_state, 'operator_retry', v_now);
    outcome := 'applied';
    return next;
end
$$;

-- Marks a failed or waiting step done with an optional output; it then
-- satisfies its dependents like `complete`.
create function weft.resolve_step(p_task_id uuid, p_step_name text, p_output jsonb default null)
returns table (step_id uuid, outcome text)
language plpgsql as $$
declare
    v_now timestamptz;
    v_task_state text;
    s weft.steps%rowtype;
begin
    select t.state into v_task_state from weft.tasks t where t.id = p_task_id for update;
    if not found then
        outcome := 'task_not_found';
        return next;
        return;
    end if;
    select * into s from weft.steps where task_id = p_task_id and name = p_step_name;
    if not found then
        outcome := 'step_not_found';
        return next;
        return;
    end if;
    step_id := s.id;
    if v_task_state = 'cancelled' then
        outcome := 'task_cancelled';
        return next;
        return;
    end if;
    if s.state not in ('error', 'pending', 'waiting_retry') then
        outcome := 'not_resolvable';
        return next;
        return;
    end if;
    v_now := clock_timestamp();
    update weft.steps
       set state = 'resolved', output = p_output, finished_at = v_now, next_attempt_at = null, msg_id = null
     where id = s.id and state = s.state;
    insert into weft.step_transitions (task_id, step_id, attempt, from_state, to_state, reason, at)
    values (p_task_id, s.id, s.attempts, s.state, 'resolved', 'operator_resolve', v_now);
    perform weft.reopen_task(p_task_id, v_task_state, 'operator_resolve', v_now);
    outcome := 'applied';
    return next;
end
$$;

-- A task in `error` goes back to `running` after an operator repair.
create function weft.reopen_task(p_task_id uuid, p_from text, p_reason text, p_now timestamptz)
returns void language plpgsql as $$
begin
    if p_from = 'error' then
        update weft.tasks set state = 'running', finished_at = null, updated_at = p_now
         where id = p_task_id and state = 'error';
        insert into weft.task_transitions (task_id, from_state, to_state, reason, at)
        values (p_task_id, 'error', 'running', p_reason, p_now);
    end if;
end
$$;

-- The invariant checker behind `weft check`: one row per invariant with the
-- number of violations and a few examples. `p_grace` leaves time for work
-- in progress (a retry that just became due, a result not yet applied).
create function weft.check_invariants(p_grace interval default interval '30 seconds')
returns table (invariant text, violations bigint, examples text[])
language plpgsql as $$
declare
    v_ns text;
    v_missing bigint := 0;
    v_missing_examples text[] := '{}';
    v_count bigint;
    v_examples text[];
begin
    return query
    select 'no step is enqueued before its dependencies completed'::text, count(*),
           (array_agg(enq.step_id::text))[1:5]
    from weft.step_transitions enq
    join weft.step_edges e on e.step_id = enq.step_id
    where enq.to_state = 'enqueued'
      and not exists (select 1 from weft.step_transitions done
                      where done.step_id = e.depends_on and done.to_state in ('complete', 'resolved')
                        and done.at <= enq.at);

    return query
    select 'no attempt has two applied results'::text, count(*), (array_agg(d.step_id::text))[1:5]
    from (select t.step_id from weft.step_transitions t where t.from_state = 'enqueued'
          group by t.step_id, t.attempt having count(*) > 1) d;

    return query
    select 'every step (joins included) is enqueued once per attempt'::text, count(*),
           (array_agg(s.id::text))[1:5]
    from weft.steps s
    where s.attempts <> (select count(*) from weft.step_transitions t
                         where t.step_id = s.id and t.to_state = 'enqueued');

    return query
    select 'no open task is stuck (nothing in flight, nothing due, not finalized)'::text, count(*),
           (array_agg(c.task_id::text || ' ' || c.execution_status))[1:5]
    from weft.tasks t
    join weft.task_execution_context(array(select id from weft.tasks where state in ('pending', 'running'))) c
      on c.task_id = t.id
    where t.state in ('pending', 'running')
      and t.updated_at < clock_timestamp() - p_grace
      and (c.execution_status = 'all_complete'
           or (c.execution_status = 'blocked_by_failures' and c.enqueued_steps = 0
               and (t.on_failure = 'fail_fast' or (c.ready_steps = 0 and c.retry_due_later_steps = 0)))
           or (c.execution_status = 'has_ready_steps'
               and exists (select 1 from weft.step_readiness(array[t.id]) r
                           join weft.steps s on s.id = r.step_id
                           where r.ready and (s.state = 'pending'
                                              or s.next_attempt_at < clock_timestamp() - p_grace)))
           or (c.execution_status = 'waiting_for_dependencies' and c.retry_due_later_steps = 0));

    -- An enqueued step's message is on its queue, or its result is waiting
    -- on the result queue, or it was dead-lettered.
    for v_ns in select name from weft.namespaces loop
        execute format(
            $q$
            select count(*), (array_agg(s.id::text))[1:5]
            from weft.steps s join weft.tasks t on t.id = s.task_id
            where t.namespace = $1 and s.state = 'enqueued'
              and s.enqueued_at < clock_timestamp() - $2
              and not exists (select 1 from pgmq.%I q where q.msg_id = s.msg_id)
              and not exists (select 1 from pgmq.q_weft_results r
                              where r.message ->> 'step_id' = s.id::text
                                and (r.message ->> 'attempt')::int = s.attempts)
              and not exists (select 1 from pgmq.%I d
                              where d.message -> 'message' ->> 'step_id' = s.id::text)
            $q$, pgmq.format_table_name('weft_steps_' || v_ns, 'q'),
                 pgmq.format_table_name('weft_dlq_' || v_ns, 'q'))
        into v_count, v_examples
        using v_ns, p_grace;
        v_missing := v_missing + v_count;
        v_missing_examples := v_missing_examples || coalesce(v_examples, '{}');
    end loop;
    invariant := 'every enqueued step has its message, its result, or a dead letter';
    violations := v_missing;
    examples := v_missing_examples[1:5];
    return next;
end
$$;

-- Every dead letter, of every namespace and of the result queue, oldest first.
create function weft.dead_letters(p_limit bigint)
returns table (queue text, msg_id bigint, enqueued_at timestamptz, message jsonb)
language plpgsql stable as $$
declare
    v_queue text;
    v_sql text := '';
begin
    for v_queue in
        select m.queue_name from pgmq.meta m
        where m.queue_name like 'weft\_dlq\_%' or m.queue_name = 'weft_results_dlq'
    loop
        v_sql := v_sql || case when v_sql = '' then '' else ' union all ' end
              || format('select %L::text, msg_id, enqueued_at, message from pgmq.%I',
                        v_queue, pgmq.format_table_name(v_queue, 'q'));
    end loop;
    if v_sql = '' then
        return;
    end if;
    return query execute 'select * from (' || v_sql || ') d order by enqueued_at, msg_id limit $1'
        using p_limit;
end
$$;

-- Removes one dead letter and returns it (replay, in the caller's transaction).
create function weft.take_dead_letter(p_queue text, p_msg_id bigint)
returns table (queue text, msg_id bigint, enqueued_at timestamptz, message jsonb)
language plpgsql as $$
begin
    if not (p_queue like 'weft\_dlq\_%' or p_queue = 'weft_results_dlq')
       or not exists (select 1 from pgmq.meta m where m.queue_name = p_queue) then
        return;
    end if;
    return query execute format(
        'delete from pgmq.%I where msg_id = $1 returning %L::text, msg_id, enqueued_at, message',
        pgmq.format_table_name(p_queue, 'q'), p_queue)
        using p_msg_id;
end
$$;
