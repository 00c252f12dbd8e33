//! Harness for the side-by-side comparison of tower-breakwater's layers with other crates.
//!
//! Every subject is measured the same way: one value built once, then, inside one
//! `block_on` on a current-thread tokio runtime (timers enabled), a loop of calls; for a
//! tower service each call is `svc.ready().await?.call(req).await?` on an inner service
//! that answers `Ok` at once. Criterion's median of the per-call time is reported.
//!
//! Subjects are grouped in categories. In each category the first subject registered with
//! [`Category::ours`] is the reference; every peer is printed with its ratio to it
//! (`peer / ours`, so above 1.0x means the peer is slower). A category without one of our
//! subjects prints the peers with `—` as ratio.
//!
//! Single-thread subjects are also run, after their measurement, through a counting global
//! allocator (the default `allocs` feature): the allocations of 2,000 calls minus those of
//! 1,000, over 1,000, are printed as allocations per call. The counting allocator costs a
//! few nanoseconds per allocation, paid by the subjects that allocate; build with
//! `--no-default-features` to time every subject on the plain system allocator.
//!
//! The contended variant ([`Harness::contended`]) runs two OS threads, each with its own
//! current-thread runtime, calling clones of one shared subject; it reports nanoseconds per
//! call per thread (the slower thread's time over the calls one thread made).

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Ready;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime};

use criterion::Criterion;
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

/// The inner service of every tower subject (see [`inner`]).
pub type Inner = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

/// The inner service of every tower subject: answers `Ok(req)` at once, never pending.
pub fn inner() -> Inner {
    tower::service_fn(|x: u64| std::future::ready(Ok(x)))
}

/// A current-thread runtime with timers enabled, as every subject runs on.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
}

/// What a measured subject is in its category's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// One of our layers; the first one of a category is the ratio's denominator.
    Ours,
    /// Another crate's implementation, printed with its ratio to ours.
    Peer,
    /// A floor for reading the others (no middleware, a clock read); no ratio.
    Baseline,
}

#[derive(Debug)]
struct Row {
    category: &'static str,
    group: String,
    label: &'static str,
    role: Role,
    ran: bool,
    /// Allocations per call, when counted.
    allocs: Option<f64>,
}

/// Runs the subjects through criterion and prints the table.
pub struct Harness {
    criterion: Criterion,
    rt: Runtime,
    rows: Vec<Row>,
    /// Estimates written before this are from an earlier run (criterion's test mode, for
    /// one, runs the subjects without writing any) and are not reported. One second before
    /// the harness was made, as file times come from a coarser clock.
    started: SystemTime,
}

impl Harness {
    /// A harness on `criterion` (configure measurement times and filters on it first).
    pub fn new(criterion: Criterion) -> Self {
        Self {
            criterion,
            rt: runtime(),
            rows: Vec::new(),
            started: SystemTime::now() - Duration::from_secs(1),
        }
    }

    /// Starts a single-thread category. `slug` names the criterion group (`<slug>/<label>`
    /// is what a command-line filter matches), `title` is printed in the table. Requests are
    /// the loop counter unless changed with [`Category::requests`].
    pub fn category(&mut self, slug: &'static str, title: &'static str) -> Category<'_> {
        Category {
            h: self,
            slug,
            title,
            request: |i| i,
        }
    }

    /// Starts a contended category: two OS threads, each calling its own clone of one
    /// shared subject. Criterion groups are named `contended-<slug>`.
    pub fn contended(&mut self, slug: &'static str, title: &'static str) -> Contended<'_> {
        Contended {
            h: self,
            group: format!("contended-{slug}"),
            title,
        }
    }

    fn record(&mut self, category: &'static str, group: &str, label: &'static str, role: Role) {
        self.rows.push(Row {
            category,
            group: group.to_owned(),
            label,
            role,
            ran: false,
            allocs: None,
        });
    }

    /// Measures `f` (one call per iteration) as `group/label` on the harness's runtime, then
    /// counts its allocations per call if it ran.
    fn single<R, F>(&mut self, group: &str, label: &'static str, mut f: F)
    where
        F: AsyncFnMut(u64) -> R,
    {
        let rt = &self.rt;
        let mut ran = false;
        let mut g = self.criterion.benchmark_group(group);
        g.bench_function(label, |b| {
            ran = true;
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters {
                        black_box(f(black_box(i)).await);
                    }
                    start.elapsed()
                })
            })
        });
        g.finish();
        let row = self.rows.last_mut().expect("recorded before measured");
        row.ran = ran;
        if ran {
            row.allocs = allocs_per_call(&self.rt, &mut f);
        }
    }

    /// The table of this run as markdown, from the estimates criterion wrote under
    /// [`criterion_home`].
    pub fn table(&self) -> String {
        self.render(&criterion_home())
    }

    fn render(&self, home: &std::path::Path) -> String {
        let mut out = String::new();
        out.push_str("| category | subject | ns/call | ratio to ours | allocs/call |\n");
        out.push_str("|---|---|---:|---|---:|\n");
        let mut i = 0;
        while i < self.rows.len() {
            let cat = self.rows[i].category;
            let end = i + self.rows[i..]
                .iter()
                .take_while(|r| r.category == cat)
                .count();
            let rows = &self.rows[i..end];
            let median = |r: &Row| {
                r.ran
                    .then(|| read_median(home, &r.group, r.label, self.started))
                    .flatten()
            };
            let reference = rows
                .iter()
                .find(|r| r.role == Role::Ours)
                .map(|r| (r.label, median(r)));
            for r in rows {
                let ns = median(r);
                let ns_text = match (r.ran, ns) {
                    (false, _) => "not run".to_owned(),
                    (true, None) => "no estimate".to_owned(),
                    (true, Some(ns)) => format_ns(ns),
                };
                let ratio = match (r.role, reference, ns) {
                    (Role::Baseline, ..) => String::new(),
                    (Role::Ours, Some((label, _)), _) if label == r.label => "reference".to_owned(),
                    (_, Some((ours, Some(ours_ns))), Some(ns)) if ours_ns > 0.0 => {
                        format!("{} / {} = {:.1}x", r.label, ours, ns / ours_ns)
                    }
                    _ => "—".to_owned(),
                };
                let allocs = r.allocs.map_or_else(|| "—".to_owned(), format_allocs);
                out.push_str(&format!(
                    "| {cat} | {} | {ns_text} | {ratio} | {allocs} |\n",
                    r.label
                ));
            }
            i = end;
        }
        out
    }
}

fn format_allocs(n: f64) -> String {
    if n.fract() == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n:.2}")
    }
}

/// Calls counted for [`allocs_per_call`].
const ALLOC_CALLS: u64 = 1_000;

/// Allocations per call of `f`, on this thread: those of a `block_on` running
/// `2 * ALLOC_CALLS` calls minus those of one running `ALLOC_CALLS`, over `ALLOC_CALLS` (so
/// that what a `block_on` allocates once does not count), after a warm-up. `None` without
/// the `allocs` feature.
fn allocs_per_call<R>(rt: &Runtime, f: &mut impl AsyncFnMut(u64) -> R) -> Option<f64> {
    #[cfg(feature = "allocs")]
    {
        let mut run = |n: u64| {
            allocation_counter::measure(|| {
                rt.block_on(async {
                    for i in 0..n {
                        black_box(f(black_box(i)).await);
                    }
                })
            })
            .count_total
        };
        run(100);
        let once = run(ALLOC_CALLS);
        let twice = run(2 * ALLOC_CALLS);
        Some(twice.saturating_sub(once) as f64 / ALLOC_CALLS as f64)
    }
    #[cfg(not(feature = "allocs"))]
    {
        let _ = (rt, f);
        None
    }
}

fn format_ns(ns: f64) -> String {
    if ns >= 1000.0 {
        format!("{ns:.0}")
    } else {
        format!("{ns:.1}")
    }
}

/// A single-thread category being filled; see [`Harness::category`].
pub struct Category<'h> {
    h: &'h mut Harness,
    slug: &'static str,
    title: &'static str,
    request: fn(u64) -> u64,
}

impl Category<'_> {
    /// Maps the loop counter to the request every tower subject of this category receives
    /// (a cache category sends one key so that every call hits).
    pub fn requests(mut self, request: fn(u64) -> u64) -> Self {
        self.request = request;
        self
    }

    /// Measures one of our layers, as a tower service.
    pub fn ours<S>(&mut self, label: &'static str, svc: S) -> &mut Self
    where
        S: Service<u64>,
        S::Error: Debug,
    {
        self.service(label, Role::Ours, svc)
    }

    /// Measures a peer's tower service.
    pub fn peer<S>(&mut self, label: &'static str, svc: S) -> &mut Self
    where
        S: Service<u64>,
        S::Error: Debug,
    {
        self.service(label, Role::Peer, svc)
    }

    /// Measures a floor (no ratio), as a tower service.
    pub fn baseline<S>(&mut self, label: &'static str, svc: S) -> &mut Self
    where
        S: Service<u64>,
        S::Error: Debug,
    {
        self.service(label, Role::Baseline, svc)
    }

    /// Measures a peer that is not a tower service: `call(i)` is one call.
    pub fn peer_fn<R>(
        &mut self,
        label: &'static str,
        call: impl AsyncFnMut(u64) -> R,
    ) -> &mut Self {
        self.h.record(self.title, self.slug, label, Role::Peer);
        self.h.single(self.slug, label, call);
        self
    }

    /// Measures a floor that is not a tower service (no ratio).
    pub fn baseline_fn<R>(
        &mut self,
        label: &'static str,
        call: impl AsyncFnMut(u64) -> R,
    ) -> &mut Self {
        self.h.record(self.title, self.slug, label, Role::Baseline);
        self.h.single(self.slug, label, call);
        self
    }

    fn service<S>(&mut self, label: &'static str, role: Role, mut svc: S) -> &mut Self
    where
        S: Service<u64>,
        S::Error: Debug,
    {
        let request = self.request;
        self.h.record(self.title, self.slug, label, role);
        self.h.single(self.slug, label, async |i| {
            svc.ready()
                .await
                .expect("ready")
                .call(request(i))
                .await
                .expect("the call succeeds")
        });
        self
    }
}

/// A contended category being filled; see [`Harness::contended`].
pub struct Contended<'h> {
    h: &'h mut Harness,
    group: String,
    title: &'static str,
}

/// OS threads in a contended measurement.
pub const THREADS: usize = 2;

impl Contended<'_> {
    /// Measures one of our layers: each thread calls its own clone of `svc`.
    pub fn ours<S>(&mut self, label: &'static str, svc: S) -> &mut Self
    where
        S: Service<u64> + Clone + Send,
        S::Error: Debug,
    {
        self.service(label, Role::Ours, svc)
    }

    /// Measures a peer's tower service: each thread calls its own clone of `svc`.
    pub fn peer<S>(&mut self, label: &'static str, svc: S) -> &mut Self
    where
        S: Service<u64> + Clone + Send,
        S::Error: Debug,
    {
        self.service(label, Role::Peer, svc)
    }

    /// Measures a peer that is not a tower service: `make()` is called once per thread
    /// (on the spawning thread) and returns that thread's caller, which must share its
    /// state with the other thread's.
    pub fn peer_fn<R, G>(&mut self, label: &'static str, make: impl Fn() -> G) -> &mut Self
    where
        G: AsyncFnMut(u64) -> R + Send,
    {
        self.h.record(self.title, &self.group, label, Role::Peer);
        self.measure(label, make);
        self
    }

    fn service<S>(&mut self, label: &'static str, role: Role, svc: S) -> &mut Self
    where
        S: Service<u64> + Clone + Send,
        S::Error: Debug,
    {
        self.h.record(self.title, &self.group, label, role);
        self.measure(label, || {
            let mut svc = svc.clone();
            async move |i| {
                svc.ready()
                    .await
                    .expect("ready")
                    .call(i)
                    .await
                    .expect("the call succeeds")
            }
        });
        self
    }

    fn measure<R, G>(&mut self, label: &'static str, make: impl Fn() -> G)
    where
        G: AsyncFnMut(u64) -> R + Send,
    {
        let mut ran = false;
        let mut g = self.h.criterion.benchmark_group(&self.group);
        g.bench_function(label, |b| {
            ran = true;
            b.iter_custom(|iters| {
                let barrier = Barrier::new(THREADS);
                std::thread::scope(|scope| {
                    let handles: Vec<_> = (0..THREADS)
                        .map(|_| {
                            let mut call = make();
                            let barrier = &barrier;
                            scope.spawn(move || {
                                let rt = runtime();
                                barrier.wait();
                                rt.block_on(async {
                                    let start = Instant::now();
                                    for i in 0..iters {
                                        black_box(call(black_box(i)).await);
                                    }
                                    start.elapsed()
                                })
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("a bench thread panicked"))
                        .max()
                        .unwrap_or(Duration::ZERO)
                })
            })
        });
        g.finish();
        self.h
            .rows
            .last_mut()
            .expect("recorded before measured")
            .ran = ran;
    }
}

/// Where criterion writes its results, found the way criterion finds it: `CRITERION_HOME`,
/// else `$CARGO_TARGET_DIR/criterion`, else the target directory `cargo metadata` reports,
/// else `target/criterion`.
pub fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    let metadata = std::env::var_os("CARGO").and_then(|cargo| {
        std::process::Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .ok()
    });
    metadata
        .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
        .and_then(|v| v["target_directory"].as_str().map(PathBuf::from))
        .map(|target| target.join("criterion"))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}

/// Criterion's directory name for an id part (its `make_filename_safe`, on Unix).
fn dir_name(part: &str) -> String {
    part.replace(
        &['?', '"', '/', '\\', '*', '<', '>', ':', '|', '^'][..],
        "_",
    )
}

/// The median point estimate, in nanoseconds per iteration, of `group/label`'s run, if
/// that run wrote its estimates after `since`.
fn read_median(home: &std::path::Path, group: &str, label: &str, since: SystemTime) -> Option<f64> {
    let path = home
        .join(dir_name(group))
        .join(dir_name(label))
        .join("new")
        .join("estimates.json");
    let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if written < since {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_estimate(home: &std::path::Path, group: &str, label: &str, median: f64) {
        let dir = home.join(dir_name(group)).join(dir_name(label)).join("new");
        std::fs::create_dir_all(&dir).unwrap();
        let json = format!(
            r#"{{"median":{{"point_estimate":{median}}},"mean":{{"point_estimate":1.0}}}}"#
        );
        std::fs::write(dir.join("estimates.json"), json).unwrap();
    }

    #[test]
    fn ratios_are_peer_over_the_first_of_ours_and_dashes_without_ours() {
        let home = std::env::temp_dir().join(format!("breakwater-compare-{}", std::process::id()));
        let mut h = Harness::new(Criterion::default());
        let rows = [
            ("timeout", "t", "ours a", Role::Ours, Some(20.0)),
            ("timeout", "t", "ours b", Role::Ours, Some(30.0)),
            ("timeout", "t", "peer/x", Role::Peer, Some(50.0)),
            ("timeout", "t", "peer y", Role::Peer, None),
            ("breaker", "b", "lonely peer", Role::Peer, Some(40.0)),
            ("baseline", "z", "floor", Role::Baseline, Some(2.0)),
        ];
        for (category, group, label, role, median) in rows {
            h.record(category, group, label, role);
            let row = h.rows.last_mut().unwrap();
            row.ran = median.is_some();
            row.allocs = (label == "peer/x")
                .then_some(2.5)
                .or((label == "ours a").then_some(0.0));
            if let Some(m) = median {
                write_estimate(&home, group, label, m);
            }
        }
        let table = h.render(&home);
        std::fs::remove_dir_all(&home).unwrap();
        let lines: Vec<&str> = table.lines().skip(2).collect();
        assert_eq!(
            lines,
            [
                "| timeout | ours a | 20.0 | reference | 0 |",
                "| timeout | ours b | 30.0 | ours b / ours a = 1.5x | — |",
                "| timeout | peer/x | 50.0 | peer/x / ours a = 2.5x | 2.50 |",
                "| timeout | peer y | not run | — | — |",
                "| breaker | lonely peer | 40.0 | — | — |",
                "| baseline | floor | 2.0 |  | — |",
            ]
        );
    }

    #[test]
    fn estimates_older_than_the_run_are_ignored() {
        let home =
            std::env::temp_dir().join(format!("breakwater-compare-old-{}", std::process::id()));
        write_estimate(&home, "g", "l", 5.0);
        let later = SystemTime::now() + Duration::from_secs(60);
        assert_eq!(
            read_median(&home, "g", "l", SystemTime::UNIX_EPOCH),
            Some(5.0)
        );
        assert_eq!(read_median(&home, "g", "l", later), None);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
