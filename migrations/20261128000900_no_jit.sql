-- No JIT compilation on the engine's functions. A generic plan's cost is an
-- estimate from the statistics of the moment, and after an autovacuum
-- ANALYZE of a growing table the readiness statement of enqueue_ready_steps
-- was estimated at 1.76 million (jit_above_cost is 100,000, the inlining
-- and optimization thresholds 500,000): every execution then compiled 72
-- functions with LLVM, 2.3 to 3.1 s of CPU each, in every backend at once.
-- Those were the multi-second stalls under load (auto_explain showed
-- `JIT: Functions: 72, Inlining true, Optimization true` on each stalled
-- statement; with JIT off, none in six W5 levels). The engine runs short
-- statements driven by a few ids, where JIT only ever costs; so every
-- PL/pgSQL function of the schema, those of earlier migrations and these,
-- runs with jit off (SQL-language functions are left alone: a SET clause
-- would stop PostgreSQL from inlining them into their callers, which are
-- covered). Weft's own connections also set jit off for the session.
do $$
declare
    v_fn regprocedure;
begin
    for v_fn in
        select p.oid::regprocedure
          from pg_proc p
          join pg_namespace n on n.oid = p.pronamespace
          join pg_language l on l.oid = p.prolang
         where n.nspname = 'weft' and l.lanname = 'plpgsql'
    loop
        execute format('alter function %s set jit = off', v_fn);
    end loop;
end
$$;
