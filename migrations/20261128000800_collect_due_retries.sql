-- Retries that fall due while results are flowing ride along with the next
-- result batch. Under a retry storm the collectors run back to back and keep
-- both cores busy, and the retry scheduler's iteration waited for CPU behind
-- them: W6 measured its retries dispatched 43 ms (p50) and 179 ms (p99)
-- after they fell due. A collector batch now also claims up to 100 tasks
-- with a retry due (`FOR UPDATE SKIP LOCKED`, so it never waits on another
-- orchestrator and never deadlocks with one) and advances them with the
-- batch's own tasks. The scheduler still sleeps until the earliest due time
-- and dispatches whatever no collector took, so an idle fleet's retries run
-- on time too.

-- As in 20261128000600_cached_plans.sql, plus the due retries. Returns
-- {applied, enqueued, finalized (as advance_tasks), retries: how many steps
-- of due retries it enqueued}.
create or replace function weft.collect_results(p_results jsonb, p_msg_ids bigint[])
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
    v_due uuid[];
    v_advanced jsonb;
begin
    select coalesce(jsonb_agg(jsonb_build_object(
               'step_id', a.step_id, 'attempt', a.attempt, 'outcome', a.outcome)), '[]')
      into v_applied
      from weft.apply_results(p_results) a;

    v_task_ids := array(select distinct (x ->> 'task_id')::uuid
                          from jsonb_array_elements(p_results) x);
    -- The batch's own tasks are locked by this transaction already, so the
    -- claim would return them again: they are left out (a hashed subplan).
    v_due := array(select c.task_id
                     from weft.claim_due_retry_tasks(clock_timestamp(), 100) c
                    where c.task_id not in (select t from unnest(v_task_ids) t));
    v_advanced := weft.advance_tasks(v_task_ids || v_due);

    delete from pgmq.q_weft_results where msg_id = any (p_msg_ids);

    return v_advanced || jsonb_build_object(
        'applied', v_applied,
        'retries', (select count(*) from jsonb_array_elements(v_advanced -> 'enqueued') e
                     where (e ->> 'task_id')::uuid = any (v_due)));
end
$$;
