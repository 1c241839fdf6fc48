-- Weft's durable model: namespaces, immutable templates, tasks, steps, their
-- dependency edges and an append-only history. pgmq itself is installed
-- before this migration by the migrator, from the SQL the pgmq crate embeds.
-- Constraints here make illegal states unrepresentable; the engine relies on them.

create schema weft;

-- The result queue is shared by every namespace; step and dead-letter queues
-- are created per namespace by weft.ensure_namespace.
select pgmq.create('weft_results');

create table weft.namespaces (
    name text primary key
        constraint namespace_name_valid check (name ~ '^[a-z][a-z0-9_]{0,29}$'),
    created_at timestamptz not null default now()
);

create table weft.templates (
    id bigint generated always as identity primary key,
    namespace text not null references weft.namespaces (name),
    name text not null constraint template_name_valid check (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    version integer not null constraint version_positive check (version >= 1),
    -- The parsed, fully resolved definition (defaults applied): what tasks are built from.
    definition jsonb not null,
    created_at timestamptz not null default now(),
    unique (namespace, name, version)
);

create table weft.tasks (
    id uuid primary key,
    template_id bigint not null references weft.templates (id),
    namespace text not null references weft.namespaces (name),
    state text not null default 'pending'
        constraint task_state_valid check (state in ('pending', 'running', 'complete', 'error', 'cancelled')),
    on_failure text not null
        constraint on_failure_valid check (on_failure in ('fail_fast', 'continue')),
    input jsonb not null,
    priority integer not null default 0,
    -- SHA-256 of the client's idempotency key, and of the request it came with.
    idempotency_key_hash text,
    request_hash text,
    -- W3C trace context of the span that created the task.
    trace_context jsonb,
    created_at timestamptz not null default now(),
    started_at timestamptz,
    finished_at timestamptz,
    updated_at timestamptz not null default now(),
    constraint finished_iff_terminal
        check ((state in ('complete', 'error', 'cancelled')) = (finished_at is not null)),
    constraint running_has_started check (state <> 'running' or started_at is not null),
    constraint idempotency_has_request check ((idempotency_key_hash is null) = (request_hash is null))
);

create unique index tasks_idempotency_key on weft.tasks (namespace, idempotency_key_hash)
    where idempotency_key_hash is not null;
create index tasks_by_created on weft.tasks (created_at desc, id desc);
create index tasks_by_template on weft.tasks (template_id, created_at desc);
create index tasks_active on weft.tasks (id) where state in ('pending', 'running');

create table weft.steps (
    id uuid primary key,
    task_id uuid not null references weft.tasks (id) on delete cascade,
    -- Declaration order in the template, for stable listings.
    position integer not null constraint position_non_negative check (position >= 0),
    name text not null,
    handler text not null,
    config jsonb not null,
    state text not null default 'pending'
        constraint step_state_valid check (state in
            ('pending', 'enqueued', 'waiting_retry', 'complete', 'error', 'cancelled', 'resolved')),
    -- The attempt counter only ever grows: it is the fencing token of results.
    -- An operator's retry grants a fresh budget by moving attempt_floor up to it.
    attempts integer not null default 0 constraint attempts_non_negative check (attempts >= 0),
    attempt_floor integer not null default 0,
    max_attempts integer not null constraint max_attempts_positive check (max_attempts >= 1),
    -- False once a permanent failure was recorded for the current budget.
    retryable boolean not null default true,
    timeout_ms integer not null constraint timeout_positive check (timeout_ms > 0),
    backoff_initial_ms integer not null constraint backoff_initial_positive check (backoff_initial_ms > 0),
    backoff_max_ms integer not null,
    backoff_multiplier double precision not null constraint multiplier_at_least_one check (backoff_multiplier >= 1),
    backoff_jitter text not null constraint jitter_valid check (backoff_jitter in ('full', 'equal', 'none')),
    -- When a waiting_retry step may run again.
    next_attempt_at timestamptz,
    -- When the current attempt was enqueued, and its pgmq message.
    enqueued_at timestamptz,
    msg_id bigint,
    output jsonb,
    last_error jsonb,
    finished_at timestamptz,
    unique (task_id, name),
    unique (task_id, id),
    constraint floor_within_attempts check (attempt_floor between 0 and attempts),
    constraint backoff_max_at_least_initial check (backoff_max_ms >= backoff_initial_ms),
    constraint enqueued_has_attempt
        check (state <> 'enqueued' or (attempts > attempt_floor and enqueued_at is not null)),
    constraint waiting_retry_iff_due
        check ((state = 'waiting_retry') = (next_attempt_at is not null)),
    constraint waiting_retry_has_run check (state <> 'waiting_retry' or attempts > attempt_floor),
    constraint finished_iff_done
        check ((state in ('complete', 'resolved', 'error', 'cancelled')) = (finished_at is not null)),
    constraint complete_has_run check (state <> 'complete' or attempts >= 1)
);

-- The retry scheduler's hot query: the earliest due retry.
create index steps_due_retries on weft.steps (next_attempt_at) where state = 'waiting_retry';
create index steps_in_flight on weft.steps (enqueued_at) where state = 'enqueued';

-- "step_id depends on depends_on", both steps of the same task.
create table weft.step_edges (
    task_id uuid not null,
    step_id uuid not null,
    depends_on uuid not null,
    primary key (step_id, depends_on),
    foreign key (task_id, step_id) references weft.steps (task_id, id) on delete cascade,
    foreign key (task_id, depends_on) references weft.steps (task_id, id) on delete cascade,
    constraint no_self_dependency check (step_id <> depends_on)
);
create index step_edges_dependents on weft.step_edges (depends_on);

create table weft.task_transitions (
    id bigint generated always as identity primary key,
    task_id uuid not null references weft.tasks (id) on delete cascade,
    from_state text,
    to_state text not null,
    reason text,
    at timestamptz not null default now()
);
create index task_transitions_by_task on weft.task_transitions (task_id, id);

create table weft.step_transitions (
    id bigint generated always as identity primary key,
    task_id uuid not null,
    step_id uuid not null,
    attempt integer not null,
    from_state text,
    to_state text not null,
    -- Why: the result's outcome, a failure's reason, an operator's action.
    reason text,
    detail jsonb,
    at timestamptz not null default now(),
    foreign key (task_id, step_id) references weft.steps (task_id, id) on delete cascade
);
create index step_transitions_by_step on weft.step_transitions (step_id, id);
create index step_transitions_by_task on weft.step_transitions (task_id);

-- Exactly-once enqueue and exactly-once result, per attempt, enforced by the
-- schema: a second enqueue of the same attempt (a join enqueued twice) or a
-- second applied result for one attempt fails its transaction.
create unique index step_enqueued_once_per_attempt
    on weft.step_transitions (step_id, attempt) where to_state = 'enqueued';
create unique index step_result_once_per_attempt
    on weft.step_transitions (step_id, attempt) where from_state = 'enqueued';

-- History is append-only: rows may be pruned with their task, never rewritten.
create function weft.refuse_update() returns trigger language plpgsql as $$
begin
    raise exception 'weft.% is append-only', tg_table_name using errcode = 'check_violation';
end
$$;
create trigger task_transitions_append_only before update on weft.task_transitions
    for each row execute function weft.refuse_update();
create trigger step_transitions_append_only before update on weft.step_transitions
    for each row execute function weft.refuse_update();

-- Registers a namespace and creates its step queue and dead-letter queue.
-- Idempotent, so template registration can call it every time.
create function weft.ensure_namespace(p_name text) returns void language plpgsql as $$
begin
    insert into weft.namespaces (name) values (p_name) on conflict do nothing;
    if found then
        perform pgmq.create('weft_steps_' || p_name);
        perform pgmq.create('weft_dlq_' || p_name);
    end if;
end
$$;
