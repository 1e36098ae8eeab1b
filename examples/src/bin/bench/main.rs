//! Courier's benchmark: Courier against the physical limit, per transport.
//!
//! For each transport it runs **raw** (a length-prefixed socket carrying
//! the bytes), **raw+cbor** (the same socket carrying the same messages
//! encoded and decoded with ciborium, no runtime) and **courier** (two
//! nodes, a remote actor), and prints medians and ratios. Each round runs
//! in a process of its own. Round trips take turns, each implementation
//! in a process of its own on one shared processor (see `rtt_turns`), so
//! machine noise falls on all alike; the other measurements run one
//! implementation after the other. Client and server run on one thread in
//! every case, so the figures compare the work done, not thread wake-ups.
//!
//! ```text
//! cargo run --release -p courier-examples --bin bench                 # full run (a few minutes)
//! cargo run --release -p courier-examples --bin bench -- --quick      # a few seconds (CI)
//! cargo run --release -p courier-examples --bin bench -- --json out.json --svg plot.svg
//! cargo run --release -p courier-examples --bin bench -- --transports tcp,unix
//! ```

#![allow(missing_docs)] // a program, not a library: its items are private

mod actors;
mod courier_side;
mod raw;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use report::{Sample, Table};

/// Which transports exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Unix,
    Fd,
    Quic,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Unix => "unix",
            Kind::Fd => "fd",
            Kind::Quic => "quic",
        }
    }

    fn parse(name: &str) -> Result<Self, String> {
        [Kind::Tcp, Kind::Unix, Kind::Fd, Kind::Quic]
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| format!("unknown transport {name:?}"))
    }
}

/// The implementations a round trip is measured for.
const RTT_IMPLS: [&str; 3] = ["raw", "raw+cbor", "courier"];

/// How long each measurement runs.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub rounds: usize,
    pub rtt_iters: usize,
    pub oneway_msgs: usize,
    pub big_iters: usize,
    pub concurrent_calls: usize,
    pub connections: usize,
    pub local_iters: usize,
    pub ref_iters: usize,
    pub mem_conns: usize,
    pub mem_refs: usize,
}

impl Budget {
    fn full() -> Self {
        Self {
            rounds: 5,
            rtt_iters: 20_000,
            oneway_msgs: 200_000,
            big_iters: 200,
            concurrent_calls: 20_000,
            connections: 100,
            local_iters: 200_000,
            ref_iters: 10_000,
            mem_conns: 200,
            mem_refs: 20_000,
        }
    }

    fn quick() -> Self {
        Self {
            rounds: 1,
            rtt_iters: 500,
            oneway_msgs: 5_000,
            big_iters: 5,
            concurrent_calls: 640,
            connections: 10,
            local_iters: 5_000,
            ref_iters: 200,
            mem_conns: 10,
            mem_refs: 200,
        }
    }
}

#[derive(Clone)]
struct Args {
    budget: Budget,
    quick: bool,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
    transports: Vec<Kind>,
    only: Vec<String>,
}

/// Parses the arguments after the first `skip`.
fn parse_args(skip: usize) -> Result<Args, String> {
    let mut a = Args {
        budget: Budget::full(),
        quick: false,
        json: None,
        svg: None,
        transports: vec![Kind::Tcp, Kind::Unix, Kind::Fd, Kind::Quic],
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(skip);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.quick = true;
                a.budget = Budget::quick();
            }
            "--json" => a.json = Some(it.next().ok_or("--json needs a file")?.into()),
            "--svg" => a.svg = Some(it.next().ok_or("--svg needs a file")?.into()),
            "--rounds" => {
                a.budget.rounds = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("--rounds needs a number")?
            }
            "--transports" => {
                let list = it.next().ok_or("--transports needs a list")?;
                a.transports = list.split(',').map(Kind::parse).collect::<Result<_, _>>()?;
            }
            "--only" => {
                a.only = it
                    .next()
                    .ok_or("--only needs a list (rtt,oneway,1mib,64callers,refs,fds,100conns,local,memory)")?
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            "-h" | "--help" => {
                return Err("usage: bench [--quick] [--rounds N] [--transports tcp,unix,fd,quic] [--only rtt,oneway,...] [--json FILE] [--svg FILE]".into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(a)
}

fn main() {
    // Memory is measured in a fresh child process: a process that already
    // ran the other measurements has freed memory its allocator reuses.
    if std::env::var_os("BENCH_TRACE").is_some() {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(std::io::stderr)
            .init();
    }
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--memory-child") {
        let n = |i: usize| argv.get(i).and_then(|v| v.parse().ok()).unwrap_or(100);
        let dir = std::env::temp_dir();
        let samples = actix::System::new().block_on(courier_side::memory(&dir, n(2), n(3)));
        // (one process per round: see `rounds_in_children`)
        for s in samples {
            println!("{}", s.line());
        }
        return;
    }
    if argv.get(1).map(String::as_str) == Some("--rtt-side") {
        match rtt_side(&argv[2..]) {
            Ok(samples) => {
                for s in samples {
                    println!("{}", s.line());
                }
                return;
            }
            Err(e) => {
                eprintln!("--rtt-side: {e}");
                std::process::exit(2);
            }
        }
    }
    // `--round-child ARGS...`: one round of ARGS in this process, samples
    // printed one per line for the parent (see `rounds_in_children`).
    let child = argv.get(1).map(String::as_str) == Some("--round-child");
    let args = match parse_args(if child { 2 } else { 1 }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if child {
        let mut one = args.clone();
        one.budget.rounds = 1;
        for s in run_in_process(one) {
            println!("{}", s.line());
        }
        return;
    }
    eprintln!(
        "courier bench: {} round(s), transports {:?}{}",
        args.budget.rounds,
        args.transports.iter().map(|k| k.name()).collect::<Vec<_>>(),
        if args.quick { " (quick)" } else { "" }
    );
    let mut samples = if args.budget.rounds > 1 {
        rounds_in_children(&args)
    } else {
        run_in_process(args.clone())
    };
    if args.only.is_empty() || args.only.iter().any(|o| o == "memory") {
        samples.extend(memory_in_child(args.budget.mem_conns, args.budget.mem_refs));
    }
    let table = Table::new(samples);
    print!("{}", table.text());
    if let Some(p) = &args.json {
        if let Err(e) = std::fs::write(p, table.json()) {
            eprintln!("cannot write {}: {e}", p.display());
            std::process::exit(1);
        }
    }
    if let Some(p) = &args.svg {
        if let Err(e) = std::fs::write(p, table.svg()) {
            eprintln!("cannot write {}: {e}", p.display());
            std::process::exit(1);
        }
    }
}

/// Runs the measurements as a task on the arbiter, as actor code does,
/// not as the future `block_on` drives: tokio polls its I/O driver once
/// more (an extra `epoll_wait`) each time that future is woken.
fn run_in_process(args: Args) -> Vec<Sample> {
    actix::System::new()
        .block_on(async move { actix::spawn(async move { run(&args).await }).await })
        .expect("benchmark task")
}

/// Runs each round in a fresh process. Where a process's memory lands
/// (address-space randomisation) moves Courier's round trip by up to a
/// third from one process to the next on this machine, while the raw
/// baselines barely notice; one process per round makes the medians a
/// sample of placements rather than one draw.
fn rounds_in_children(args: &Args) -> Vec<Sample> {
    let exe = std::env::current_exe().expect("the benchmark's own path");
    let passed: Vec<String> = std::env::args().skip(1).collect();
    let mut out = Vec::new();
    for round in 0..args.budget.rounds {
        eprintln!("round {}/{} (own process)", round + 1, args.budget.rounds);
        let res = std::process::Command::new(&exe)
            .arg("--round-child")
            .args(&passed)
            .stderr(std::process::Stdio::inherit())
            .output();
        let o = match res {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                eprintln!("round {} failed: {}", round + 1, o.status);
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("cannot start a round: {e}");
                std::process::exit(1);
            }
        };
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(Sample::from_line),
        );
    }
    out
}

fn memory_in_child(conns: usize, refs: usize) -> Vec<Sample> {
    let Ok(exe) = std::env::current_exe() else {
        return Vec::new();
    };
    let out = match std::process::Command::new(exe)
        .args(["--memory-child", &conns.to_string(), &refs.to_string()])
        .output()
    {
        Ok(o) if o.status.success() => o,
        _ => {
            eprintln!("memory measurement failed");
            return Vec::new();
        }
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(Sample::from_line)
        .collect()
}

fn progress(what: &str) {
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!("  {what}");
    }
}

/// Round trips of the implementations `imps` (of "raw", "raw+cbor",
/// "courier"), `n` measured each. Each runs in a process of its own (see
/// [`rtt_side`]), and they take turns: all set up their connections and
/// warm up with a tenth as many round trips, then make blocks of
/// [`RTT_BLOCK`] in turn, the order rotating each block, so a spell of
/// noise on the host, which can last longer than a whole measurement,
/// falls on all alike. In processes of their own because sharing one
/// would tax the baselines with Courier's upkeep: idle Courier nodes on
/// the thread cost a raw round trip 8% more instructions (their armed
/// heartbeat timers make every park read the clock and scan the timer
/// wheel). All on one processor, because on this host a process's
/// round trips run at one of two speeds depending on where it is
/// scheduled (Courier's 9 or 12 µs over unix), and processes left to the
/// scheduler drew their speeds apart. One implementation alone runs
/// here, in this process (for profiling it: `BENCH_IMPL`).
async fn rtt_turns(kind: Kind, dir: &std::path::Path, n: usize, imps: &[&str]) -> Vec<Sample> {
    if let [imp] = imps {
        let mut side = RttSide::new(imp, kind, dir).await;
        let warm_up = (n / 10) as u64;
        side.run(0..warm_up, &mut Vec::new()).await;
        let mut lat = Vec::with_capacity(n);
        side.run(warm_up..warm_up + n as u64, &mut lat).await;
        side.finish().await;
        return report::Latencies(lat).samples(kind.name(), "rtt", imp);
    }
    let exe = std::env::current_exe().expect("the benchmark's own path");
    let cpu = shared_cpu().map_or_else(|| "any".to_owned(), |c| c.to_string());
    let mut sides = Vec::new();
    for imp in imps {
        let child = std::process::Command::new(&exe)
            .args(["--rtt-side", imp, kind.name(), &n.to_string(), &cpu])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start a round trip process");
        sides.push(SideProcess::new(child));
    }
    for side in sides.iter_mut() {
        side.expect("ready");
    }
    let blocks = n.div_ceil(RTT_BLOCK);
    for block in 0..blocks {
        let k = RTT_BLOCK.min(n - block * RTT_BLOCK);
        let count = sides.len();
        for turn in 0..count {
            let side = &mut sides[(turn + block) % count];
            side.say(&format!("run {k}"));
            side.expect("done");
        }
    }
    let mut out = Vec::new();
    for side in sides {
        out.extend(side.finish());
    }
    out
}

/// A process running [`rtt_side`], driven line by line.
struct SideProcess {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl SideProcess {
    fn new(mut child: std::process::Child) -> Self {
        let input = child.stdin.take().expect("piped");
        let output = std::io::BufReader::new(child.stdout.take().expect("piped"));
        Self {
            child,
            input,
            output,
        }
    }

    fn say(&mut self, line: &str) {
        use std::io::Write;
        if let Err(e) = writeln!(self.input, "{line}") {
            eprintln!("a round trip process stopped taking orders: {e}");
            std::process::exit(1);
        }
    }

    fn expect(&mut self, word: &str) {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self.output.read_line(&mut line).unwrap_or(0);
        if n == 0 || line.trim() != word {
            eprintln!("a round trip process said {line:?}, not {word:?}");
            std::process::exit(1);
        }
    }

    /// Ends the process and reads its samples.
    fn finish(mut self) -> Vec<Sample> {
        use std::io::BufRead;
        self.say("end");
        drop(self.input);
        let out: Vec<Sample> = self
            .output
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| Sample::from_line(&l))
            .collect();
        match self.child.wait() {
            Ok(s) if s.success() => out,
            other => {
                eprintln!("a round trip process failed: {other:?}");
                std::process::exit(1);
            }
        }
    }
}

/// The processor the round trip processes share: the last this process
/// may run on. `None` when that cannot be read.
fn shared_cpu() -> Option<usize> {
    let set = rustix::thread::sched_getaffinity(None).ok()?;
    (0..rustix::thread::CpuSet::MAX_CPU)
        .rev()
        .find(|&c| set.is_set(c))
}

/// Keeps this process on processor `cpu`, as its rivals are kept (see
/// [`rtt_turns`]).
fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("cannot keep the round trips on processor {cpu} ({e}); they run anywhere");
    }
}

/// `--rtt-side IMPL TRANSPORT N CPU`: one implementation's round trips
/// for [`rtt_turns`], in this process, kept on processor CPU (unless it
/// is `any`). Sets up, warms up with N/10 round trips and says `ready`;
/// then for each `run K` on standard input makes K measured round trips
/// and says `done`; at `end` (or the end of the input) prints its p50 and
/// p99 as samples and exits. An argument or order it does not know is an
/// error, with nothing printed.
fn rtt_side(args: &[String]) -> Result<Vec<Sample>, String> {
    use std::io::{BufRead, Write};
    let [imp, kind, n, cpu] = args else {
        return Err("usage: --rtt-side raw|raw+cbor|courier TRANSPORT COUNT CPU|any".into());
    };
    let imp = RTT_IMPLS
        .into_iter()
        .find(|i| i == imp)
        .ok_or_else(|| format!("no implementation {imp:?}"))?;
    let kind = Kind::parse(kind)?;
    let n: usize = n.parse().map_err(|_| format!("not a count: {n:?}"))?;
    if cpu != "any" {
        pin_to(
            cpu.parse()
                .map_err(|_| format!("not a processor: {cpu:?}"))?,
        );
    }
    let dir = std::env::temp_dir().join(format!("courier-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
    let d = dir.clone();
    let samples = actix::System::new()
        .block_on(async move {
            actix::spawn(async move {
                let mut side = RttSide::new(imp, kind, &d).await;
                let warm_up = (n / 10) as u64;
                side.run(0..warm_up, &mut Vec::new()).await;
                let mut stdout = std::io::stdout();
                let _ = writeln!(stdout, "ready").and_then(|()| stdout.flush());
                let mut lat = Vec::with_capacity(n);
                let mut next = warm_up;
                let mut line = String::new();
                // Waiting for the next turn blocks this thread: nothing
                // else of this process needs to run meanwhile.
                let mut result = Ok(());
                while std::io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words[..] {
                        ["run", k] if k.parse::<u64>().is_ok() => {
                            let k: u64 = k.parse().unwrap_or_default();
                            side.run(next..next + k, &mut lat).await;
                            next += k;
                            let _ = writeln!(stdout, "done").and_then(|()| stdout.flush());
                        }
                        ["end"] => break,
                        _ => {
                            result = Err(format!("unknown order {:?}", line.trim_end()));
                            break;
                        }
                    }
                    line.clear();
                }
                side.finish().await;
                result.map(|()| report::Latencies(lat).samples(kind.name(), "rtt", imp))
            })
            .await
        })
        .map_err(|e| format!("the round trip task failed: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    samples?
}

/// Round trips per implementation per turn in [`rtt_turns`]: about 10 ms
/// of work, so each turn's first, colder round trips weigh nothing, and
/// handing the turn over (a pipe write and a process wake-up, outside
/// the measured round trips) is rare.
const RTT_BLOCK: usize = 1000;

/// One implementation in [`rtt_turns`].
enum RttSide {
    Raw(raw::Rtt),
    Courier(courier_side::Rtt),
}

impl RttSide {
    /// `imp` is one of [`RTT_IMPLS`].
    async fn new(imp: &str, kind: Kind, dir: &std::path::Path) -> Self {
        match imp {
            "raw" => RttSide::Raw(raw::Rtt::new(kind, dir, false).await),
            "raw+cbor" => RttSide::Raw(raw::Rtt::new(kind, dir, true).await),
            _ => RttSide::Courier(courier_side::Rtt::new(kind, dir).await),
        }
    }

    /// The round trips numbered `ids`, each one's latency appended to `lat`.
    async fn run(&mut self, ids: std::ops::Range<u64>, lat: &mut Vec<Duration>) {
        for i in ids {
            let t = Instant::now();
            match self {
                RttSide::Raw(r) => r.one(i).await,
                RttSide::Courier(c) => c.one(i).await,
            }
            lat.push(t.elapsed());
        }
    }

    async fn finish(self) {
        if let RttSide::Courier(c) = self {
            c.finish().await;
        }
    }
}

async fn run(args: &Args) -> Vec<Sample> {
    let dir = std::env::temp_dir().join(format!("courier-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut b = args.budget;
    // For profiling: BENCH_RTT_ITERS, BENCH_ONEWAY_MSGS, BENCH_CALLS (64
    // callers) and BENCH_LOCAL_ITERS override counts.
    for (var, count) in [
        ("BENCH_RTT_ITERS", &mut b.rtt_iters),
        ("BENCH_ONEWAY_MSGS", &mut b.oneway_msgs),
        ("BENCH_LOCAL_ITERS", &mut b.local_iters),
        ("BENCH_CALLS", &mut b.concurrent_calls),
    ] {
        if let Some(n) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
            *count = n;
        }
    }
    let want = |m: &str| args.only.is_empty() || args.only.iter().any(|o| o == m);
    // For profiling one implementation alone: BENCH_IMPL=raw|raw+cbor|courier.
    let imp = std::env::var("BENCH_IMPL").ok();
    let run_impl = |i: &str| imp.as_deref().is_none_or(|x| x == i);
    let mut out = Vec::new();
    for round in 0..b.rounds {
        if b.rounds > 1 {
            eprintln!("round {}/{}", round + 1, b.rounds);
        }
        for &kind in &args.transports {
            let t = kind.name();
            if want("rtt") {
                let imps: Vec<&str> = RTT_IMPLS.into_iter().filter(|i| run_impl(i)).collect();
                out.extend(rtt_turns(kind, &dir, b.rtt_iters, &imps).await);
            }
            if want("oneway") {
                if run_impl("raw") {
                    let r = raw::oneway(kind, &dir, b.oneway_msgs, false).await;
                    out.push(r.sample(t, "oneway", "raw"));
                }
                if run_impl("raw+cbor") {
                    let r = raw::oneway(kind, &dir, b.oneway_msgs, true).await;
                    out.push(r.sample(t, "oneway", "raw+cbor"));
                }
                if run_impl("courier") {
                    let r = courier_side::oneway(kind, &dir, b.oneway_msgs).await;
                    out.push(r.sample(t, "oneway", "courier"));
                }
            }
            if want("1mib") {
                if run_impl("raw") {
                    let r = raw::big(kind, &dir, b.big_iters).await;
                    out.push(r.sample(t, "1mib", "raw"));
                }
                if run_impl("courier") {
                    let r = courier_side::big(kind, &dir, b.big_iters, false).await;
                    out.push(r.sample(t, "1mib", "courier"));
                }
                if run_impl("courier+bytes") {
                    let r = courier_side::big(kind, &dir, b.big_iters, true).await;
                    out.push(r.sample(t, "1mib", "courier+bytes"));
                }
            }
            if want("64callers") {
                if run_impl("raw") {
                    let r = raw::pipelined(kind, &dir, b.concurrent_calls, 64).await;
                    out.push(r.sample(t, "64callers", "raw"));
                }
                if run_impl("courier") {
                    let r = courier_side::concurrent(kind, &dir, b.concurrent_calls, 64).await;
                    out.push(r.sample(t, "64callers", "courier"));
                }
            }
            if want("refs") {
                let r = courier_side::refs(kind, &dir, b.ref_iters).await;
                out.push(r.sample(t, "refs", "courier"));
            }
            if want("fds") && matches!(kind, Kind::Unix | Kind::Fd) {
                let r = courier_side::fds(kind, &dir, b.ref_iters).await;
                out.push(r.sample(t, "fds", "courier"));
            }
        }
        if want("100conns") {
            let r = raw::many_connections(&dir, b.connections, b.rtt_iters / 10).await;
            out.push(r.sample("tcp", "100conns", "raw"));
            let r = courier_side::many_connections(&dir, b.connections, b.rtt_iters / 10).await;
            out.push(r.sample("tcp", "100conns", "courier"));
        }
        if want("local") {
            if run_impl("actix") {
                let r = courier_side::actix_local(b.local_iters).await;
                out.push(r.sample("local", "local", "actix"));
            }
            if run_impl("courier") {
                let r = courier_side::courier_local(b.local_iters).await;
                out.push(r.sample("local", "local", "courier"));
            }
            if run_impl("actix") {
                let r = courier_side::actix_local_oneway(b.oneway_msgs).await;
                out.push(r.sample("local", "oneway", "actix"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}
