-- Retention: finished tasks (with their steps, edges and history) and pgmq
-- archive rows older than a cut-off are deleted in bounded batches, so the
-- tables do not grow without bound and no transaction holds locks for long.
-- Running tasks are never touched.

create index tasks_finished on weft.tasks (finished_at) where finished_at is not null;

-- Deletes up to p_batch finished tasks that finished before p_before, and up
-- to p_batch archive rows per queue archived before it. Returns what it
-- deleted; call again while it deletes a full batch.
create function weft.prune(p_before timestamptz, p_batch integer)
returns table (tasks bigint, archived_messages bigint)
language plpgsql as $$
declare
    v_ids uuid[];
    v_queue text;
    v_count bigint;
begin
    select array_agg(id) into v_ids from (
        select t.id from weft.tasks t
        where t.state in ('complete', 'error', 'cancelled') and t.finished_at < p_before
        order by t.finished_at
        limit p_batch
        for update skip locked
    ) doomed;
    tasks := coalesce(cardinality(v_ids), 0);
    if tasks > 0 then
        delete from weft.stale_results where task_id = any (v_ids);
        -- Steps, edges and both histories go with their task (on delete cascade).
        delete from weft.tasks where id = any (v_ids);
    end if;

    archived_messages := 0;
    for v_queue in select m.queue_name from pgmq.meta m where m.queue_name like 'weft\_%' loop
        execute format(
            'with doomed as (select msg_id from pgmq.%1$I where archived_at < $1 limit $2)
             delete from pgmq.%1$I a using doomed where a.msg_id = doomed.msg_id',
            pgmq.format_table_name(v_queue, 'a'))
        using p_before, p_batch;
        get diagnostics v_count = row_count;
        archived_messages := archived_messages + v_count;
    end loop;
    return next;
end
$$;
