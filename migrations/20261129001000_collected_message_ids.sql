-- A collector batch says which result messages it applied. Workers now
-- name the results they send in their notification's payload, and the
-- collectors of one orchestrator remember what their batches took, so a
-- wake-up for results a batch already applied (a notification that
-- arrives while the batch that takes its results runs, or that the other
-- collector of the crew acted on first) starts no empty batch.

-- As in 20261129000100_collect_in_one_statement.sql, returning also
-- {msg_ids: the applied results' message ids, in `results`' order}.
create or replace function weft.collect_batch(p_limit integer, p_lease_secs integer)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
declare
    v_ids bigint[];
    v_checked jsonb[];
    v_results jsonb;
    v_unchecked bigint[];
    v_out jsonb := '{}';
begin
    -- Checked once each, and only once locked: a check in the locking
    -- scan itself would also run on every row another collector holds.
    with picked as materialized (
        select q.msg_id, q.message
          from pgmq.q_weft_results q
         where q.vt <= clock_timestamp()
         order by q.msg_id
         limit p_limit
           for update skip locked
    ),
    checked as materialized (
        select p.msg_id, weft.checked_result(p.message) as checked from picked p
    )
    select array_agg(c.msg_id order by c.msg_id) filter (where c.checked is not null),
           array_agg(c.checked order by c.msg_id) filter (where c.checked is not null),
           array_agg(c.msg_id order by c.msg_id) filter (where c.checked is null)
      into v_ids, v_checked, v_unchecked
      from checked c;

    if v_ids is not null then
        v_results := to_jsonb(v_checked);
        v_out := weft.collect_results(v_results, v_ids)
                 || jsonb_build_object('results', v_results, 'msg_ids', to_jsonb(v_ids));
    end if;

    if v_unchecked is not null then
        with leased as (
            update pgmq.q_weft_results q
               set last_read_at = clock_timestamp(),
                   vt = clock_timestamp() + make_interval(secs => p_lease_secs),
                   read_ct = q.read_ct + 1
             where q.msg_id = any (v_unchecked)
            returning q.msg_id, q.read_ct, q.enqueued_at, q.message
        )
        select v_out || jsonb_build_object('unchecked', jsonb_agg(to_jsonb(l) order by l.msg_id))
          into v_out
          from leased l;
    end if;
    return v_out;
end
$$;
