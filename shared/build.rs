// `sqlx::migrate!` embeds migrations/ at compile time; rebuild when it changes
// (a new file included), or the binary would silently run stale migrations.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
