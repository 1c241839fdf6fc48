//! The REST API over real HTTP: an in-process orchestrator on a free port and
//! a fresh database per test. Every route and every error it documents, the
//! OpenAPI document against the router, idempotency under concurrency,
//! authentication and scopes, and snapshots of the JSON shapes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use orchestrator::{Auth, OrchestratorConfig, Scope, Token};
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::fleet::{self, Proc};
use crate::support;

const READ: &str = "reader-secret";
const WRITE: &str = "writer-secret";
const ADMIN: &str = "admin-secret";

fn tokens() -> Auth {
    Auth::with_tokens(vec![
        Token::from_secret("reader", Scope::Read, READ),
        Token::from_secret("writer", Scope::Write, WRITE),
        Token::from_secret("admin", Scope::Admin, ADMIN),
    ])
}

const DIAMOND: &str = "
namespace: demo
name: diamond
version: 1
steps:
  - { name: a, handler: builtin.noop }
  - { name: b, handler: builtin.noop, depends_on: [a] }
  - { name: c, handler: builtin.noop, depends_on: [a] }
  - { name: d, handler: builtin.noop, depends_on: [b, c] }
";

/// Fails once, permanently: a step an operator must retry or resolve.
const FAILING: &str = "
namespace: demo
name: failing
version: 1
steps:
  - name: a
    handler: builtin.fail
    config: { mode: permanent, times: 1 }
    retry: { max_attempts: 1 }
  - { name: b, handler: builtin.noop, depends_on: [a] }
";

/// Every `/v1` route, with the scope it needs (None: open).
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/v1/openapi.json", None),
    ("GET", "/v1/templates", Some("read")),
    ("POST", "/v1/templates", Some("write")),
    (
        "GET",
        "/v1/templates/{namespace}/{name}/{version}",
        Some("read"),
    ),
    ("GET", "/v1/tasks", Some("read")),
    ("POST", "/v1/tasks", Some("write")),
    ("POST", "/v1/tasks/batch", Some("write")),
    ("GET", "/v1/tasks/{id}", Some("read")),
    ("GET", "/v1/tasks/{id}/explain", Some("read")),
    ("GET", "/v1/tasks/{id}/history", Some("read")),
    ("POST", "/v1/tasks/{id}/cancel", Some("write")),
    ("POST", "/v1/tasks/{id}/steps/{step}/retry", Some("admin")),
    ("POST", "/v1/tasks/{id}/steps/{step}/resolve", Some("admin")),
    ("GET", "/v1/queues", Some("read")),
    ("GET", "/v1/dlq", Some("read")),
    ("POST", "/v1/dlq/{id}/replay", Some("admin")),
];

/// What a request sends.
enum Req {
    Empty,
    Json(Value),
    Raw(&'static str, Vec<u8>),
}

/// A response: status, headers and the body (JSON, or a JSON string of the text).
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn content_type(&self) -> &str {
        self.headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts a problem document with this status and returns it.
    fn problem(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "{self:#?}");
        assert_eq!(self.content_type(), "application/problem+json", "{self:#?}");
        assert_eq!(self.body["status"], json!(status), "{self:#?}");
        assert!(self.body["detail"].is_string(), "{self:#?}");
        &self.body
    }

    /// The path of the first field error.
    fn error_path(&self) -> &str {
        self.body["errors"][0]["path"].as_str().unwrap_or("<none>")
    }

    fn id(&self) -> String {
        self.body["id"].as_str().expect("an id").to_owned()
    }
}

/// An orchestrator serving the API on a free port, on a fresh database.
struct Server {
    base: String,
    http: reqwest::Client,
    pool: PgPool,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), orchestrator::Error>>,
}

impl Server {
    async fn start() -> Server {
        let pool = support::fresh_pool().await;
        Server::start_on(pool, tokens()).await
    }

    async fn start_on(pool: PgPool, auth: Auth) -> Server {
        let addr: SocketAddr = format!("127.0.0.1:{}", fleet::free_port()).parse().unwrap();
        let config = OrchestratorConfig {
            http_addr: Some(addr),
            auth,
            ..fleet::orchestrator_config()
        };
        let stop = CancellationToken::new();
        let handle = tokio::spawn(orchestrator::run(config, pool.clone(), stop.clone()));
        let server = Server {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            pool,
            stop,
            handle,
        };
        let url = format!("{}/health/ready", server.base);
        let ready = support::wait_until(Duration::from_secs(30), || async {
            let response = server.http.get(&url).send().await;
            response.is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(ready, "the API did not become ready");
        server
    }

    async fn send(&self, method: Method, path: &str, token: Option<&str>, req: Req) -> Reply {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request = match req {
            Req::Empty => request,
            Req::Json(value) => request.json(&value),
            Req::Raw(content_type, bytes) => request.header(CONTENT_TYPE, content_type).body(bytes),
        };
        let response = request.send().await.expect("send the request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("read the body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, Some(ADMIN), Req::Empty).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(Method::POST, path, Some(ADMIN), Req::Json(body))
            .await
    }

    async fn post_raw(
        &self,
        path: &str,
        content_type: &'static str,
        body: impl Into<Vec<u8>>,
    ) -> Reply {
        self.send(
            Method::POST,
            path,
            Some(ADMIN),
            Req::Raw(content_type, body.into()),
        )
        .await
    }

    async fn register(&self, yaml: &str) -> Reply {
        self.post_raw("/v1/templates", "application/yaml", yaml)
            .await
    }

    async fn create(&self, body: Value) -> Reply {
        self.post("/v1/tasks", body).await
    }

    async fn stop(self) {
        self.stop.cancel();
        self.handle
            .await
            .expect("the orchestrator task")
            .expect("the orchestrator stopped cleanly");
    }
}

/// The document's operations: (method, path) → operation.
fn operations(document: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            out.insert((method.to_uppercase(), path.clone()), operation.clone());
        }
    }
    out
}

/// A documented path with its parameters filled in.
fn concrete(path: &str, task: &str) -> String {
    let dead_letter = "weft_dlq_demo:1";
    path.replace("{namespace}", "demo")
        .replace("{name}", "diamond")
        .replace("{version}", "1")
        .replace("{step}", "a")
        .replace(
            "{id}",
            if path.starts_with("/v1/dlq") {
                dead_letter
            } else {
                task
            },
        )
}

#[tokio::test]
async fn openapi_document_matches_the_router() {
    let s = Server::start().await;
    let doc = s
        .send(Method::GET, "/v1/openapi.json", None, Req::Empty)
        .await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.content_type(), "application/json");
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    let ops = operations(&doc.body);

    // The document lists exactly the routes of the API, each with its scope.
    let documented: BTreeSet<(String, String, Option<String>)> = ops
        .iter()
        .map(|((method, path), op)| {
            let scope = op["security"][0]["bearer"][0].as_str().map(str::to_owned);
            (method.clone(), path.clone(), scope)
        })
        .collect();
    let expected: BTreeSet<(String, String, Option<String>)> = ROUTES
        .iter()
        .map(|(m, p, s)| (m.to_string(), p.to_string(), s.map(str::to_owned)))
        .collect();
    assert_eq!(documented, expected);

    // Every documented route is served, and answers with a documented status.
    s.register(DIAMOND).await;
    let task = Uuid::now_v7().to_string();
    for ((method, path), op) in &ops {
        let url = concrete(path, &task);
        let req = if method == "POST" {
            Req::Json(json!({}))
        } else {
            Req::Empty
        };
        let reply = s
            .send(method.parse().unwrap(), &url, Some(ADMIN), req)
            .await;
        assert_ne!(reply.status, 405, "{method} {url}");
        assert_ne!(
            reply.body["detail"],
            json!("no such route"),
            "{method} {url}"
        );
        assert!(
            op["responses"].get(reply.status.to_string()).is_some(),
            "{method} {url} answered {} which is not documented: {reply:#?}",
            reply.status
        );
    }
    // Unknown routes are problem documents too.
    s.get("/v1/nothing").await.problem(404);
    s.stop().await;
}

#[tokio::test]
async fn every_operation_documents_its_errors() {
    let doc = orchestrator::api::openapi(&tokens());
    let doc = serde_json::to_value(&doc).unwrap();
    for ((method, path), op) in operations(&doc) {
        let responses = op["responses"].as_object().unwrap();
        let has = |status: &str| responses.contains_key(status);
        let scope = op["security"][0]["bearer"][0].as_str();
        let at = format!("{method} {path}");
        assert!(responses.keys().any(|s| s.starts_with('2')), "{at}");
        if path != "/v1/openapi.json" {
            assert!(has("401") && has("503"), "{at}");
        }
        assert_eq!(has("403"), matches!(scope, Some("write" | "admin")), "{at}");
        if path.contains("{id}") || path.contains("{version}") {
            assert!(has("400") && has("404"), "{at}");
        }
        if method == "POST" && op.get("requestBody").is_some() {
            assert!(has("413") && has("422"), "{at}");
        }
        if op["parameters"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"))
        {
            assert!(has("400"), "{at}");
        }
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response["content"]["application/problem+json"]["schema"]["$ref"],
                    json!("#/components/schemas/Problem"),
                    "{at} {status}"
                );
            }
        }
    }
    // Without authentication, the document asks for none.
    let open = serde_json::to_value(orchestrator::api::openapi(&Auth::Off)).unwrap();
    for ((method, path), op) in operations(&open) {
        assert!(op.get("security").is_none(), "{method} {path}");
        assert!(op["responses"].get("401").is_none(), "{method} {path}");
    }
}

#[tokio::test]
async fn templates_register_list_show_and_refuse() {
    let s = Server::start().await;
    let created = s.register(DIAMOND).await;
    assert_eq!(created.status, 201, "{created:#?}");
    assert_eq!(created.body["version"], json!(1));
    // The same content again: 200, same template.
    let again = s
        .post_raw(
            "/v1/templates",
            "application/json",
            serde_json::to_vec(&json!({
                "namespace": "demo", "name": "diamond", "version": 1,
                "steps": [
                    {"name": "a", "handler": "builtin.noop"},
                    {"name": "b", "handler": "builtin.noop", "depends_on": ["a"]},
                    {"name": "c", "handler": "builtin.noop", "depends_on": ["a"]},
                    {"name": "d", "handler": "builtin.noop", "depends_on": ["b", "c"]},
                ]
            }))
            .unwrap(),
        )
        .await;
    assert_eq!(again.status, 200, "{again:#?}");
    assert_eq!(again.body["id"], created.body["id"]);
    // Different content, same version: 409.
    let conflict = s
        .register(
            &DIAMOND
                .replace("name: d,", "name: e,")
                .replace("[b, c]", "[b]"),
        )
        .await;
    assert!(
        conflict.problem(409)["detail"]
            .as_str()
            .unwrap()
            .contains("demo/diamond@1")
    );
    // Invalid: 422 naming the field.
    let invalid = s
        .register(&DIAMOND.replace("depends_on: [b, c]", "depends_on: [b, chrage]"))
        .await;
    invalid.problem(422);
    assert_eq!(invalid.error_path(), "steps[3].depends_on[1]");
    let nul = s
        .register(&DIAMOND.replace("version: 1", "version: 2\ndescription: \"a\\0b\""))
        .await;
    nul.problem(422);
    assert_eq!(nul.error_path(), "description");
    let not_utf8 = s
        .post_raw("/v1/templates", "application/yaml", vec![0xff, 0xfe])
        .await;
    not_utf8.problem(400);
    let large = s
        .post_raw(
            "/v1/templates",
            "application/yaml",
            vec![b' '; 2 * 1024 * 1024 + 1],
        )
        .await;
    assert!(
        large.problem(413)["detail"]
            .as_str()
            .unwrap()
            .contains("2 MiB")
    );

    let list = s.get("/v1/templates").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    let none = s.get("/v1/templates?namespace=other").await;
    assert_eq!(none.body, json!({"items": []}));
    let unknown = s.get("/v1/templates?namespce=demo").await;
    unknown.problem(400);
    assert_eq!(unknown.error_path(), "namespce");

    let one = s.get("/v1/templates/demo/diamond/1").await;
    assert_eq!(one.status, 200);
    assert_eq!(
        one.body["definition"]["steps"][3]["depends_on"],
        json!(["b", "c"])
    );
    s.get("/v1/templates/demo/diamond/2").await.problem(404);
    let bad_version = s.get("/v1/templates/demo/diamond/one").await;
    bad_version.problem(400);
    assert_eq!(bad_version.error_path(), "version");
    s.stop().await;
}

#[tokio::test]
async fn tasks_create_read_list_and_refuse() {
    let s = Server::start().await;
    s.register(DIAMOND).await;
    let created = s
        .create(json!({"namespace": "demo", "name": "diamond", "input": {"order": 7}}))
        .await;
    assert_eq!(created.status, 201, "{created:#?}");
    let id = created.id();
    assert_eq!(created.body["steps"].as_array().unwrap().len(), 4);
    let read = s.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body["input"], json!({"order": 7}));
    assert!(read.body["execution_status"].is_string());

    // Refusals, each naming what is wrong.
    let missing = s.create(json!({"namespace": "demo", "name": "nope"})).await;
    assert!(
        missing.problem(404)["detail"]
            .as_str()
            .unwrap()
            .contains("demo/nope")
    );
    let not_json = s
        .post_raw("/v1/tasks", "application/json", r#"{"namespace": "demo","#)
        .await;
    not_json.problem(400);
    let trailing = s
        .post_raw(
            "/v1/tasks",
            "application/json",
            r#"{"namespace": "demo", "name": "diamond"} x"#,
        )
        .await;
    trailing.problem(400);
    for (body, path) in [
        (json!({"namespace": "Demo", "name": "diamond"}), "namespace"),
        (json!({"namespace": "demo", "name": 7}), "name"),
        (
            json!({"namespace": "demo", "name": "diamond", "version": 0}),
            "version",
        ),
        (
            json!({"namespace": "demo", "name": "diamond", "idempotency_key": ""}),
            "idempotency_key",
        ),
        (
            json!({"namespace": "demo", "name": "diamond", "colour": "red"}),
            "colour",
        ),
        (json!({"namespace": "demo"}), ""),
        (json!([1, 2]), ""),
    ] {
        let reply = s.create(body.clone()).await;
        reply.problem(422);
        assert_eq!(reply.error_path(), path, "{body}");
    }
    let huge_input = s
        .create(json!({"namespace": "demo", "name": "diamond", "input": "x".repeat(1024 * 1024)}))
        .await;
    assert!(
        huge_input.problem(413)["detail"]
            .as_str()
            .unwrap()
            .contains("1 MiB")
    );
    assert_eq!(huge_input.error_path(), "input");

    // Text PostgreSQL cannot store is refused where it is.
    let nul = s
        .create(json!({"namespace": "demo", "name": "diamond", "input": {"a": ["ok", "n\u{0}l"]}}))
        .await;
    nul.problem(422);
    assert_eq!(nul.error_path(), "input.a[1]");
    let nul_filter = s.get("/v1/tasks?namespace=de%00mo").await;
    nul_filter.problem(400);
    assert_eq!(nul_filter.error_path(), "namespace");

    s.get(&format!("/v1/tasks/{}", Uuid::now_v7()))
        .await
        .problem(404);
    let bad_id = s.get("/v1/tasks/42").await;
    bad_id.problem(400);
    assert_eq!(bad_id.error_path(), "id");

    // Listing: newest first, filters, cursor pages.
    for i in 0..4 {
        s.create(json!({"namespace": "demo", "name": "diamond", "input": {"i": i}}))
            .await;
    }
    let page = s.get("/v1/tasks?namespace=demo&limit=3").await;
    assert_eq!(page.status, 200, "{page:#?}");
    let items = page.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["input"], json!({"i": 3}));
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let rest = s.get(&format!("/v1/tasks?limit=3&cursor={cursor}")).await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 2);
    assert_eq!(rest.body["next_cursor"], Value::Null);
    let by_state = s
        .get("/v1/tasks?state=complete&name=diamond&version=1")
        .await;
    assert_eq!(by_state.body["items"], json!([]));
    let after = s.get("/v1/tasks?created_after=2000-01-01T00:00:00Z").await;
    assert_eq!(after.body["items"].as_array().unwrap().len(), 5);
    for (query, path) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("state=done", "state"),
        ("cursor=nope", "cursor"),
        ("created_after=yesterday", "created_after"),
        ("lmit=5", "lmit"),
        ("limit=5&limit=6", "limit"),
    ] {
        let reply = s.get(&format!("/v1/tasks?{query}")).await;
        reply.problem(400);
        assert_eq!(reply.error_path(), path, "{query}");
    }
    s.stop().await;
}

/// Steps declared after their dependents, dependencies listed out of
/// declaration order, two roots, retry and timeout settings.
const TANGLED: &str = "
namespace: demo
name: tangled
version: 3
on_failure: continue
steps:
  - { name: join, handler: builtin.noop, depends_on: [right, left, root] }
  - { name: right, handler: builtin.noop, depends_on: [root], timeout: 1500ms }
  - { name: root, handler: builtin.noop, config: { greeting: hé } }
  - { name: left, handler: builtin.noop, depends_on: [root], retry: { max_attempts: 7 } }
  - { name: lone, handler: builtin.noop }
";

/// `POST /v1/tasks` builds the created task's view from what it wrote
/// instead of reading it back: it must be exactly what `GET` then reads.
#[tokio::test]
async fn a_created_task_answers_exactly_as_get_reads_it() {
    let s = Server::start().await;
    s.register(DIAMOND).await;
    let registered = s.register(TANGLED).await;
    assert_eq!(registered.status, 201, "{registered:#?}");
    for (name, input, priority) in [
        (
            "diamond",
            json!({"order": 7, "lines": [1, 2.5, "x"], "nested": {"b": null, "a": true}}),
            0,
        ),
        ("tangled", json!("just a string"), -3),
        ("tangled", Value::Null, 12),
    ] {
        let created = s
            .create(
                json!({"namespace": "demo", "name": name, "input": input, "priority": priority}),
            )
            .await;
        assert_eq!(created.status, 201, "{created:#?}");
        let read = s.get(&format!("/v1/tasks/{}", created.id())).await;
        assert_eq!(read.status, 200, "{read:#?}");
        assert_eq!(created.body, read.body, "{name}");
    }
    let tangled = s
        .create(json!({"namespace": "demo", "name": "tangled"}))
        .await;
    let steps = tangled.body["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["join", "right", "root", "left", "lone"]);
    assert_eq!(steps[0]["depends_on"], json!(["right", "root", "left"]));
    let enqueued: Vec<&str> = steps
        .iter()
        .filter(|s| s["state"] == "enqueued")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(enqueued, ["root", "lone"]);
    assert_eq!(tangled.body["execution_status"], "processing");
    s.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_task() {
    let s = Server::start().await;
    s.register(DIAMOND).await;
    let body = json!({"namespace": "demo", "name": "diamond", "input": {"n": 1}, "idempotency_key": "order-1"});
    let first = s.create(body.clone()).await;
    assert_eq!(first.status, 201);
    for _ in 0..3 {
        let again = s.create(body.clone()).await;
        assert_eq!(again.status, 200, "{again:#?}");
        assert_eq!(again.id(), first.id());
    }
    let mut different = body.clone();
    different["input"] = json!({"n": 2});
    s.create(different).await.problem(409);
    // In a batch too: the existing task, not a new one.
    let batch = s.post("/v1/tasks/batch", json!({"tasks": [body]})).await;
    assert_eq!(batch.status, 201);
    assert_eq!(
        batch.body["tasks"],
        json!([{"id": first.id(), "created": false}])
    );
    // One statement inserting some tasks and skipping one by its key: only
    // the inserted tasks get steps, edges and root messages.
    let fresh = json!({"namespace": "demo", "name": "diamond", "idempotency_key": "order-2"});
    let plain = json!({"namespace": "demo", "name": "diamond"});
    let mixed = s
        .post("/v1/tasks/batch", json!({"tasks": [body, fresh, plain]}))
        .await;
    assert_eq!(mixed.status, 201, "{mixed:#?}");
    let tasks = mixed.body["tasks"].as_array().unwrap();
    assert_eq!(tasks[0], json!({"id": first.id(), "created": false}));
    let (steps, edges, messages, roots): (i64, i64, i64, Vec<String>) = sqlx::query_as(
        "select (select count(*) from weft.steps),
                (select count(*) from weft.step_edges),
                (select count(*) from pgmq.q_weft_steps_demo),
                (select array_agg(message ->> 'task_id' order by msg_id) from pgmq.q_weft_steps_demo)",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!(
        (steps, edges, messages),
        (12, 12, 3),
        "three diamonds, one root each"
    );
    let created: Vec<String> = tasks[1..]
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roots, [vec![first.id()], created].concat());
    s.stop().await;
}

/// Creation caches templates; a request without a version still gets the
/// latest one the moment it is registered, by every creation path.
#[tokio::test]
async fn a_new_version_is_used_at_once_by_requests_without_a_version() {
    let s = Server::start().await;
    s.register(DIAMOND).await;
    let version_of = |reply: Reply| {
        let s = &s;
        async move {
            assert!(reply.status == 201 || reply.status == 200, "{reply:#?}");
            let id = match reply.body["tasks"].as_array() {
                Some(tasks) => tasks[0]["id"].as_str().unwrap().to_owned(),
                None => reply.id(),
            };
            let task = s.get(&format!("/v1/tasks/{id}")).await;
            let steps = task.body["steps"].as_array().unwrap().len();
            (task.body["template_version"].as_i64().unwrap(), steps)
        }
    };
    let latest = json!({"namespace": "demo", "name": "diamond"});
    assert_eq!(version_of(s.create(latest.clone()).await).await, (1, 4));
    // The cached version 1 is now stale for "latest".
    let v2 = DIAMOND.replace("version: 1", "version: 2")
        + "  - { name: e, handler: builtin.noop, depends_on: [d] }\n";
    assert_eq!(s.register(&v2).await.status, 201);
    assert_eq!(version_of(s.create(latest.clone()).await).await, (2, 5));
    let batch = json!({"tasks": [latest.clone(), latest.clone()]});
    assert_eq!(
        version_of(s.post("/v1/tasks/batch", batch).await).await,
        (2, 5)
    );
    // A pinned version stays what it is.
    let pinned = json!({"namespace": "demo", "name": "diamond", "version": 1});
    assert_eq!(version_of(s.create(pinned).await).await, (1, 4));
    // In a transaction (an idempotency key), after yet another version.
    let v3 = DIAMOND.replace("version: 1", "version: 3")
        + "  - { name: f, handler: builtin.noop, depends_on: [d] }\n"
        + "  - { name: g, handler: builtin.noop, depends_on: [d] }\n";
    assert_eq!(s.register(&v3).await.status, 201);
    let mut keyed = latest.clone();
    keyed["idempotency_key"] = json!("k-3");
    let batch = json!({"tasks": [keyed, latest]});
    assert_eq!(
        version_of(s.post("/v1/tasks/batch", batch).await).await,
        (3, 6)
    );
    s.stop().await;
}

#[tokio::test]
async fn fifty_parallel_requests_with_one_key_create_one_task() {
    let s = Server::start().await;
    s.register(DIAMOND).await;
    let body = json!({"namespace": "demo", "name": "diamond", "idempotency_key": "race"});
    let replies = futures_util::future::join_all((0..50).map(|_| s.create(body.clone()))).await;
    let ids: BTreeSet<String> = replies.iter().map(Reply::id).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let created = replies.iter().filter(|r| r.status == 201).count();
    let existing = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!((created, existing), (1, 49));
    let count: i64 = sqlx::query_scalar("select count(*) from weft.tasks")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    s.stop().await;
}

#[tokio::test]
async fn batches_create_in_order_and_name_the_bad_item() {
    let s = Server::start().await;
    s.register(DIAMOND).await;
    let item = |i: i32| json!({"namespace": "demo", "name": "diamond", "input": {"i": i}});
    let batch = s
        .post(
            "/v1/tasks/batch",
            json!({"tasks": (0..5).map(item).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(batch.status, 201, "{batch:#?}");
    let created = batch.body["tasks"].as_array().unwrap();
    assert_eq!(created.len(), 5);
    assert!(created.iter().all(|t| t["created"] == json!(true)));
    let third = s
        .get(&format!("/v1/tasks/{}", created[2]["id"].as_str().unwrap()))
        .await;
    assert_eq!(third.body["input"], json!({"i": 2}));

    let mut tasks: Vec<Value> = (0..5).map(item).collect();
    tasks[3]["namespace"] = json!("Not-A-Namespace");
    let bad = s.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    bad.problem(422);
    assert_eq!(bad.error_path(), "tasks[3].namespace");
    tasks[3] = json!({"namespace": "demo", "name": "diamond", "extra": 1});
    let extra = s.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    assert_eq!(
        extra.problem(422)["errors"][0]["path"],
        json!("tasks[3].extra")
    );
    tasks[3] =
        json!({"namespace": "demo", "name": "diamond", "input": "x".repeat(1024 * 1024 + 1)});
    let large = s.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    large.problem(413);
    assert_eq!(large.error_path(), "tasks[3].input");
    // An array is not filled into a task by position.
    let positional = s
        .post("/v1/tasks/batch", json!({"tasks": [["demo", "diamond"]]}))
        .await;
    positional.problem(422);
    assert_eq!(positional.error_path(), "tasks[0]");
    s.post("/v1/tasks/batch", json!({"tasks": []}))
        .await
        .problem(422);
    let too_many = s
        .post("/v1/tasks/batch", json!({"tasks": vec![item(0); 1001]}))
        .await;
    assert!(
        too_many.problem(422)["detail"]
            .as_str()
            .unwrap()
            .contains("1000")
    );
    s.post(
        "/v1/tasks/batch",
        json!({"tasks": [{"namespace": "demo", "name": "nope"}]}),
    )
    .await
    .problem(404);
    s.post_raw("/v1/tasks/batch", "application/json", "{")
        .await
        .problem(400);
    // Nothing of the refused batches was created.
    let count: i64 = sqlx::query_scalar("select count(*) from weft.tasks")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(count, 5);
    s.stop().await;
}

/// Starts a worker for `demo` and waits until the task's step `a` failed.
async fn failed_task(s: &Server, stop: &CancellationToken) -> String {
    let id = s
        .create(json!({"namespace": "demo", "name": "failing"}))
        .await
        .id();
    let worker = worker::Worker::builder(fleet::worker_config("demo")).build();
    let (pool, stop) = (s.pool.clone(), stop.clone());
    tokio::spawn(async move { worker.run(pool, stop).await });
    let failed = support::wait_until(Duration::from_secs(30), || async {
        s.get(&format!("/v1/tasks/{id}")).await.body["state"] == json!("error")
    })
    .await;
    assert!(failed, "task {id} did not fail");
    id
}

#[tokio::test]
async fn operator_routes_explain_cancel_retry_and_resolve() {
    let s = Server::start().await;
    s.register(DIAMOND).await;
    s.register(FAILING).await;
    let worker_stop = CancellationToken::new();

    // Cancel: 200, then 409 once ended; 404 for no task; bodies checked.
    let id = s
        .create(json!({"namespace": "demo", "name": "diamond"}))
        .await
        .id();
    let history = s.get(&format!("/v1/tasks/{id}/history")).await;
    assert_eq!(history.status, 200);
    assert_eq!(history.body["items"][0]["reason"], json!("created"));
    s.post(&format!("/v1/tasks/{id}/cancel"), json!({"colour": 1}))
        .await
        .problem(422);
    s.post_raw(&format!("/v1/tasks/{id}/cancel"), "application/json", "{")
        .await
        .problem(400);
    let cancelled = s
        .post(&format!("/v1/tasks/{id}/cancel"), json!({"reason": "test"}))
        .await;
    assert_eq!(cancelled.status, 200, "{cancelled:#?}");
    assert_eq!(cancelled.body["state"], json!("cancelled"));
    s.send(
        Method::POST,
        &format!("/v1/tasks/{id}/cancel"),
        Some(WRITE),
        Req::Empty,
    )
    .await
    .problem(409);
    let other = Uuid::now_v7();
    s.post(&format!("/v1/tasks/{other}/cancel"), json!({}))
        .await
        .problem(404);
    s.get(&format!("/v1/tasks/{other}/history"))
        .await
        .problem(404);
    s.get(&format!("/v1/tasks/{other}/explain"))
        .await
        .problem(404);
    s.get("/v1/tasks/x/explain").await.problem(400);

    // Retry and resolve: only failed steps.
    let done = s
        .create(json!({"namespace": "demo", "name": "diamond"}))
        .await
        .id();
    s.post(&format!("/v1/tasks/{done}/steps/a/retry"), json!({}))
        .await
        .problem(409);
    s.post(&format!("/v1/tasks/{done}/steps/zz/retry"), json!({}))
        .await
        .problem(404);
    s.post(&format!("/v1/tasks/{done}/steps/a/resolve"), json!({}))
        .await
        .problem(409);
    s.post(&format!("/v1/tasks/{other}/steps/a/resolve"), json!({}))
        .await
        .problem(404);
    s.post(
        &format!("/v1/tasks/{done}/steps/a/resolve"),
        json!({"output": 1, "x": 2}),
    )
    .await
    .problem(422);

    let failed = failed_task(&s, &worker_stop).await;
    let explain = s.get(&format!("/v1/tasks/{failed}/explain")).await;
    assert_eq!(explain.status, 200);
    assert_eq!(explain.body["failed"][0]["step"], json!("a"));
    let retried = s
        .post(&format!("/v1/tasks/{failed}/steps/a/retry"), json!({}))
        .await;
    assert_eq!(retried.status, 200, "{retried:#?}");
    assert_ne!(retried.body["steps"][0]["state"], json!("error"));

    let failed = failed_task(&s, &worker_stop).await;
    let resolved = s
        .post(
            &format!("/v1/tasks/{failed}/steps/a/resolve"),
            json!({"output": {"by": "hand"}}),
        )
        .await;
    assert_eq!(resolved.status, 200, "{resolved:#?}");
    assert_eq!(resolved.body["steps"][0]["state"], json!("resolved"));
    assert_eq!(resolved.body["steps"][0]["output"], json!({"by": "hand"}));
    worker_stop.cancel();
    s.stop().await;
}

#[tokio::test]
async fn queues_and_dead_letters() {
    let s = Server::start().await;
    s.register(FAILING).await;
    let queues = s.get("/v1/queues").await;
    assert_eq!(queues.status, 200);
    let names: Vec<&str> = queues.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"weft_steps_demo"), "{names:?}");

    // A dead letter for the failed step of a task, and one naming no step.
    let worker_stop = CancellationToken::new();
    let task = failed_task(&s, &worker_stop).await;
    worker_stop.cancel();
    let step_id = s.get(&format!("/v1/tasks/{task}")).await.body["steps"][0]["id"].clone();
    for letter in [
        json!({"reason": "poison", "detail": "test", "message": {"task_id": task, "step_id": step_id, "step": "a"}}),
        json!({"reason": "poison", "detail": "test", "message": {}}),
    ] {
        sqlx::query("select pgmq.send('weft_dlq_demo', $1)")
            .bind(letter)
            .execute(&s.pool)
            .await
            .unwrap();
    }
    let letters = s.get("/v1/dlq?limit=10").await;
    assert_eq!(letters.status, 200, "{letters:#?}");
    let items = letters.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["step"], json!("a"));
    let (replayable, refused) = (
        items[0]["id"].as_str().unwrap().to_owned(),
        items[1]["id"].as_str().unwrap().to_owned(),
    );
    let replayed = s
        .post(&format!("/v1/dlq/{replayable}/replay"), json!({}))
        .await;
    assert_eq!(replayed.status, 200, "{replayed:#?}");
    assert_eq!(
        replayed.body,
        json!({"replayed": replayable, "task_id": task, "step": "a"})
    );
    s.post(&format!("/v1/dlq/{replayable}/replay"), json!({}))
        .await
        .problem(404);
    s.post(&format!("/v1/dlq/{refused}/replay"), json!({}))
        .await
        .problem(409);
    s.post("/v1/dlq/nonsense/replay", json!({}))
        .await
        .problem(400);
    s.get("/v1/dlq?limit=0").await.problem(400);
    s.get("/v1/dlq?since=1").await.problem(400);
    s.stop().await;
}

#[tokio::test]
async fn every_protected_route_needs_a_token_of_its_scope() {
    let s = Server::start().await;
    s.register(DIAMOND).await;
    let task = s
        .create(json!({"namespace": "demo", "name": "diamond"}))
        .await
        .id();
    let secrets = [("read", READ), ("write", WRITE), ("admin", ADMIN)];
    for (method, path, scope) in ROUTES {
        let url = concrete(path, &task);
        let call = |token: Option<&'static str>, raw: Option<String>| {
            let (s, url, method) = (&s, url.clone(), method.parse::<Method>().unwrap());
            async move {
                let mut request = s.http.request(method, format!("{}{url}", s.base));
                if let Some(t) = token {
                    request = request.bearer_auth(t);
                }
                if let Some(raw) = raw {
                    request = request.header("authorization", raw);
                }
                let response = request.json(&json!({})).send().await.unwrap();
                let status = response.status().as_u16();
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .map(|v| v.to_str().unwrap().to_owned());
                (status, challenge)
            }
        };
        let Some(scope) = scope else {
            assert!(call(None, None).await.0 < 400, "{method} {path}");
            continue;
        };
        let at = format!("{method} {path}");
        let (status, challenge) = call(None, None).await;
        assert_eq!(status, 401, "{at} without a token");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"weft\""), "{at}");
        let (status, challenge) = call(Some("wrong-secret"), None).await;
        assert_eq!(status, 401, "{at} with a wrong token");
        assert!(challenge.unwrap().contains("invalid_token"), "{at}");
        let basic = call(None, Some(format!("Basic {READ}"))).await;
        assert_eq!(basic.0, 401, "{at}");
        assert_eq!(call(None, Some("Bearer ".into())).await.0, 401, "{at}");
        for (token_scope, secret) in secrets {
            let (status, challenge) = call(Some(secret), None).await;
            let enough = Scope::ALL.iter().position(|s| s.as_str() == token_scope)
                >= Scope::ALL.iter().position(|s| s.as_str() == *scope);
            if enough {
                assert!(
                    status != 401 && status != 403,
                    "{at} refused a {token_scope} token: {status}"
                );
            } else {
                assert_eq!(status, 403, "{at} with a {token_scope} token");
                assert!(
                    challenge.unwrap().contains(&format!("scope=\"{scope}\"")),
                    "{at}"
                );
            }
        }
    }
    // Health, readiness and metrics are open.
    for path in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/v1/openapi.json",
    ] {
        let reply = s.send(Method::GET, path, None, Req::Empty).await;
        assert_eq!(reply.status, 200, "{path}");
    }
    // A refusal is a problem document.
    let refused = s
        .send(Method::POST, "/v1/tasks", Some(READ), Req::Json(json!({})))
        .await;
    assert_eq!(
        refused.problem(403)["detail"],
        json!("this route needs a token with the write scope")
    );
    s.stop().await;
}

/// The loops hold their connections, so a pool too small for them is a
/// startup error that says what to set, not a fleet that hangs on acquire.
#[tokio::test]
async fn a_pool_too_small_for_the_loops_is_refused_at_startup() {
    let url = support::fresh_database().await;
    let small = support::pool(&url, 5).await;
    let error = orchestrator::run(
        fleet::orchestrator_config(),
        small,
        CancellationToken::new(),
    )
    .await
    .expect_err("2 collectors, the scheduler and the listener hold 4 connections; 5 leave 1")
    .to_string();
    assert!(error.contains("allows 5 connections"), "{error}");
    assert!(error.contains("allow 6 or more"), "{error}");

    let small = support::pool(&url, 3).await;
    let worker = worker::Worker::builder(fleet::worker_config("small")).build();
    let error = worker
        .run(small, CancellationToken::new())
        .await
        .expect_err("a worker holds 3 connections and its heartbeat needs a fourth")
        .to_string();
    assert!(error.contains("allows 3 connections"), "{error}");
    assert!(error.contains("allow at least 4"), "{error}");
}

#[tokio::test]
async fn without_tokens_the_orchestrator_refuses_to_start() {
    let pool = support::fresh_pool().await;
    let config = OrchestratorConfig {
        http_addr: Some(format!("127.0.0.1:{}", fleet::free_port()).parse().unwrap()),
        auth: Auth::default(),
        ..fleet::orchestrator_config()
    };
    let result = orchestrator::run(config, pool.clone(), CancellationToken::new()).await;
    let error = result
        .expect_err("no tokens, authentication on")
        .to_string();
    assert!(error.contains("--auth off"), "{error}");

    // The binary says so before touching the database.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["orchestrator", "--http-addr", "127.0.0.1:1"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env_remove("WEFT_AUTH")
        .env_remove("WEFT_AUTH_TOKENS")
        .env_remove("WEFT_AUTH_TOKENS_FILE")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no token is configured"), "{stderr}");

    // Tokens from a file: the binary serves with them.
    let file = std::env::temp_dir().join(format!("weft-tokens-{}", Uuid::new_v4().simple()));
    let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"
    std::fs::write(&file, format!("# test tokens\nci:read:{hash}\n")).unwrap();
    let url = support::fresh_database().await;
    let addr = format!("127.0.0.1:{}", fleet::free_port());
    let file_arg = file.display().to_string();
    let _orchestrator = Proc::spawn(
        &[
            "orchestrator",
            "--http-addr",
            &addr,
            "--auth",
            "on",
            "--auth-tokens-file",
            &file_arg,
        ],
        &url,
    );
    let http = reqwest::Client::new();
    let ready = support::wait_until(Duration::from_secs(30), || async {
        let r = http.get(format!("http://{addr}/health/ready")).send().await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready);
    let anonymous = http
        .get(format!("http://{addr}/v1/tasks"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let with_token = http
        .get(format!("http://{addr}/v1/tasks"))
        .bearer_auth("test")
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status(), 200);
    std::fs::remove_file(&file).unwrap();
}

/// Replaces volatile values (ids, timestamps) by placeholders, and the given
/// ids inside strings, so shapes can be compared with literal JSON.
fn redact(value: &mut Value, ids: &[&str]) {
    const VOLATILE: &[&str] = &[
        "id",
        "task_id",
        "created_at",
        "started_at",
        "finished_at",
        "enqueued_at",
        "next_attempt_at",
        "at",
        "due_at",
    ];
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if VOLATILE.contains(&key.as_str()) && !v.is_null() {
                    *v = json!(format!("<{key}>"));
                } else {
                    redact(v, ids);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, ids)),
        Value::String(text) => {
            for id in ids {
                *text = text.replace(id, "<id>");
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn snapshots_of_the_json_shapes() {
    let s = Server::start().await;
    let mut template = s.register(DIAMOND).await.body;
    redact(&mut template, &[]);
    let step = |name: &str, deps: Value| {
        json!({
            "name": name, "handler": "builtin.noop", "config": {}, "depends_on": deps,
            "timeout_ms": 30000,
            "retry": {"max_attempts": 3, "backoff": {"initial_ms": 1000, "max_ms": 60000, "multiplier": 2.0, "jitter": "full"}}
        })
    };
    assert_eq!(
        template,
        json!({
            "id": "<id>", "namespace": "demo", "name": "diamond", "version": 1, "created_at": "<created_at>",
            "definition": {
                "namespace": "demo", "name": "diamond", "version": 1, "description": null,
                "on_failure": "fail_fast",
                "steps": [step("a", json!([])), step("b", json!(["a"])), step("c", json!(["a"])), step("d", json!(["b", "c"]))]
            }
        })
    );

    let created = s
        .create(
            json!({"namespace": "demo", "name": "diamond", "input": {"order": 7}, "priority": 2}),
        )
        .await;
    let id = created.id();
    let mut task = created.body;
    redact(&mut task, &[&id]);
    let step = |name: &str, state: &str, attempts: i32, deps: Value, ready: bool| {
        let enqueued = if state == "enqueued" {
            json!("<enqueued_at>")
        } else {
            Value::Null
        };
        json!({
            "id": "<id>", "name": name, "handler": "builtin.noop", "state": state,
            "attempts": attempts, "max_attempts": 3, "depends_on": deps, "ready": ready,
            "output": null, "last_error": null, "next_attempt_at": null,
            "enqueued_at": enqueued, "finished_at": null
        })
    };
    assert_eq!(
        task,
        json!({
            "id": "<id>", "namespace": "demo", "template_name": "diamond", "template_version": 1,
            "state": "running", "execution_status": "processing", "on_failure": "fail_fast",
            "input": {"order": 7}, "priority": 2,
            "created_at": "<created_at>", "started_at": "<started_at>", "finished_at": null,
            "steps": [
                step("a", "enqueued", 1, json!([]), false),
                step("b", "pending", 0, json!(["a"]), false),
                step("c", "pending", 0, json!(["a"]), false),
                step("d", "pending", 0, json!(["b", "c"]), false),
            ]
        })
    );

    let mut explain = s.get(&format!("/v1/tasks/{id}/explain")).await.body;
    redact(&mut explain, &[&id]);
    assert_eq!(
        explain,
        json!({
            "task_id": "<task_id>", "state": "running", "execution_status": "processing",
            "summary": "Task <id> is running and processing: `a` in flight. `b` waits on `a`; `c` waits on `a`; `d` waits on `b`, `c`.",
            "failed": [], "ready": [], "in_flight": ["a"],
            "waiting": [
                {"step": "b", "waiting_on": ["a"]},
                {"step": "c", "waiting_on": ["a"]},
                {"step": "d", "waiting_on": ["b", "c"]}
            ],
            "retries": []
        })
    );

    let mut tasks: Vec<Value> = (0..4)
        .map(|_| json!({"namespace": "demo", "name": "diamond"}))
        .collect();
    tasks[3]["namespace"] = json!("Demo");
    let problem = s.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    assert_eq!(problem.content_type(), "application/problem+json");
    assert_eq!(
        problem.body,
        json!({
            "type": "https://weft.dev/problems/invalid-request",
            "title": "invalid request",
            "status": 422,
            "detail": "invalid namespace \"Demo\": must match ^[a-z][a-z0-9_]{0,29}$",
            "errors": [{"path": "tasks[3].namespace", "message": "invalid namespace \"Demo\": must match ^[a-z][a-z0-9_]{0,29}$"}]
        })
    );
    let unauthorized = s.send(Method::GET, "/v1/tasks", None, Req::Empty).await;
    assert_eq!(
        unauthorized.body,
        json!({
            "type": "https://weft.dev/problems/unauthorized",
            "title": "unauthorized",
            "status": 401,
            "detail": "this route needs an Authorization: Bearer <token> header"
        })
    );
    s.stop().await;
}

/// The task routes' connections (`orchestrator::lender`): a settled loan goes
/// back on the shelf and is lent again as it is, an unsettled one (an error,
/// a cancelled request) goes back to the pool through sqlx's check; the shelf
/// keeps at most `KEEP`, none while the pool has none to spare, and its
/// sweeper returns what sat there `IDLE_MAX`, and everything when stopped.
#[tokio::test]
async fn the_api_lends_settled_connections_again_and_never_hoards_them() {
    use orchestrator::lender::Lender;
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 8).await;
    let lender = Lender::new(pool.clone());
    let backend = "select pg_backend_pid()";

    let mut first = lender.lend().await.unwrap();
    let pid: i32 = sqlx::query_scalar(backend)
        .fetch_one(&mut *first)
        .await
        .unwrap();
    first.settle();
    assert_eq!(lender.shelved(), 1);
    let mut second = lender.lend().await.unwrap();
    assert_eq!(lender.shelved(), 0);
    let again: i32 = sqlx::query_scalar(backend)
        .fetch_one(&mut *second)
        .await
        .unwrap();
    assert_eq!(again, pid, "the settled connection is lent again");
    drop(second);
    assert_eq!(lender.shelved(), 0, "an unsettled loan is not shelved");

    let mut loans = Vec::new();
    for _ in 0..Lender::KEEP + 2 {
        loans.push(lender.lend().await.unwrap());
    }
    for loan in loans {
        loan.settle();
    }
    assert_eq!(lender.shelved(), Lender::KEEP);

    let stop = CancellationToken::new();
    let sweeper = tokio::spawn(lender.clone().sweep(stop.clone()));
    let swept = support::wait_until(Duration::from_secs(10), || async { lender.shelved() == 0 });
    assert!(
        swept.await,
        "the sweeper returns idle connections to the pool"
    );
    lender.lend().await.unwrap().settle();
    assert_eq!(lender.shelved(), 1);
    stop.cancel();
    sweeper.await.unwrap();
    assert_eq!(
        lender.shelved(),
        0,
        "a stopped sweeper leaves nothing shelved"
    );

    // A pool with no connection to spare gets a settled one back at once:
    // someone may be waiting for it.
    let small = support::pool(&url, 2).await;
    let lender = Lender::new(small.clone());
    let (first, _second) = (lender.lend().await.unwrap(), lender.lend().await.unwrap());
    let waiter = tokio::spawn(async move { small.acquire().await.map(|_| ()) });
    first.settle();
    assert_eq!(lender.shelved(), 0);
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter).await;
    assert!(matches!(waited, Ok(Ok(Ok(())))), "{waited:?}");
}
