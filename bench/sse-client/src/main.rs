//! The measuring client of `bench/sse`: opens many server-sent event streams of the api at once and writes down
//! when each event arrives. Not a general load generator.
//!
//! ```text
//! sse-client --base http://127.0.0.1:18181 --token JWT --paths FILE --ready FILE --out FILE
//!            [--events N --done FILE] [--timeout SECONDS] [--open-concurrency N]
//! ```
//!
//! `--paths` lists one path per line, one stream each (the same path may repeat). At most `--open-concurrency`
//! requests wait for their response head at a time. Once every stream has its answer, `--ready` is written (JSON:
//! the answers by status, 200 meaning `text/event-stream`, 0 a connection error). Each stream is then read until
//! the server ends it, or the client stops: `--timeout` seconds after ready, or on SIGTERM or SIGINT. With
//! `--events N`, `--done` is written once every stream has had N events (or has ended); the streams stay open.
//!
//! At the end, `--out` gets one CSV line per event: stream, seq (0 for a stream's first event), event id, status,
//! received (µs since the Unix epoch, taken when its bytes arrive), updated_at (as in the event's data); and a
//! summary (JSON) goes to stdout.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, mpsc, watch},
};

#[derive(Parser)]
struct Args {
    /// The api, e.g. http://127.0.0.1:18181.
    #[arg(long)]
    base: String,
    /// An access token.
    #[arg(long)]
    token: String,
    /// One path per line, one stream each.
    #[arg(long)]
    paths: PathBuf,
    /// Written once every stream has its answer.
    #[arg(long)]
    ready: PathBuf,
    /// The events, as CSV, written at the end.
    #[arg(long)]
    out: PathBuf,
    /// Events each stream is expected to get: `--done` is written when every stream has had them.
    #[arg(long, default_value_t = 0, requires = "done")]
    events: usize,
    /// See `--events`.
    #[arg(long)]
    done: Option<PathBuf>,
    /// Seconds after ready at which the client closes every stream still open and stops.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Requests waiting for their response head at once.
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
}

/// One event, as received.
struct Event {
    seq: usize,
    id: String,
    status: String,
    received_us: u128,
    updated_at: String,
}

/// How a stream ended.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Not a 200 `text/event-stream` answer (or no answer at all).
    Refused,
    /// The server ended it.
    Ended,
    /// Still open when the client stopped.
    Open,
    /// The connection failed while reading, or an event was unreadable.
    Broken,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Ended => "ended_by_server",
            Self::Open => "open_at_stop",
            Self::Broken => "broken",
        }
    }
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

/// The CPU time this process has used (user and system), from `/proc/self/stat` (Linux; ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields 14 and 15 (utime, stime), counted after the command name's closing parenthesis (field 2).
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Writes `text` to `path` whole: a reader that sees the file sees all of it.
fn publish(path: &Path, text: &str) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

/// One stream: what its task needs.
struct Stream {
    client: reqwest::Client,
    url: String,
    token: Arc<str>,
    gate: Arc<Semaphore>,
    answered: mpsc::UnboundedSender<u16>,
    /// Told once, when the stream has had `expected` events or can have no more.
    settled: Option<mpsc::UnboundedSender<()>>,
    expected: usize,
    stop: watch::Receiver<bool>,
}

impl Stream {
    async fn run(mut self) -> (Outcome, Vec<Event>) {
        let mut events = Vec::new();
        let outcome = self.read(&mut events).await;
        self.settle();
        (outcome, events)
    }

    fn settle(&mut self) {
        if let Some(settled) = self.settled.take() {
            let _ = settled.send(());
        }
    }

    async fn read(&mut self, events: &mut Vec<Event>) -> Outcome {
        let answer = {
            let _permit = self.gate.acquire().await;
            self.client
                .get(&self.url)
                .bearer_auth(&self.token)
                .send()
                .await
        };
        let Ok(mut response) = answer else {
            let _ = self.answered.send(0);
            return Outcome::Refused;
        };
        let is_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
        let status = response.status().as_u16();
        let _ = self.answered.send(status);
        if status != 200 || !is_stream {
            return Outcome::Refused;
        }
        let mut buffer = String::new();
        loop {
            let chunk = tokio::select! {
                chunk = response.chunk() => chunk,
                _ = self.stop.wait_for(|stop| *stop) => return Outcome::Open,
            };
            let received_us = now_us();
            let bytes = match chunk {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return Outcome::Ended,
                Err(_) => return Outcome::Broken,
            };
            buffer.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                match parse(&block, events.len(), received_us) {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => {} // a comment (heartbeat)
                    Err(()) => return Outcome::Broken,
                }
                if events.len() == self.expected {
                    self.settle();
                }
            }
        }
    }
}

/// One event block (`event:`, `id:`, `data:` lines); `None` for a comment alone.
fn parse(block: &str, seq: usize, received_us: u128) -> Result<Option<Event>, ()> {
    let (mut id, mut data) = (String::new(), String::new());
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = value.to_owned(),
            "data" => data.push_str(value),
            _ => {} // `event`, or a comment (an empty field name)
        }
    }
    if data.is_empty() {
        return Ok(None);
    }
    let data: Value = serde_json::from_str(&data).map_err(|_| ())?;
    let text = |key: &str| data[key].as_str().map(str::to_owned).ok_or(());
    Ok(Some(Event {
        seq,
        id,
        status: text("status")?,
        received_us,
        updated_at: text("updated_at")?,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let paths = std::fs::read_to_string(&args.paths).context("cannot read --paths")?;
    let paths: Vec<&str> = paths.lines().filter(|line| !line.is_empty()).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let token: Arc<str> = args.token.into();
    let gate = Arc::new(Semaphore::new(args.open_concurrency.max(1)));
    let (answered, mut answers) = mpsc::unbounded_channel();
    let (settled, mut settlements) = mpsc::unbounded_channel();
    let (stop, stopped) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let started = Instant::now();
    let tasks: Vec<_> = paths
        .iter()
        .map(|path| {
            tokio::spawn(
                Stream {
                    client: client.clone(),
                    url: format!("{}{path}", args.base),
                    token: token.clone(),
                    gate: gate.clone(),
                    answered: answered.clone(),
                    settled: Some(settled.clone()),
                    expected: args.events,
                    stop: stopped.clone(),
                }
                .run(),
            )
        })
        .collect();

    // Each stream answers once, and settles once.
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..paths.len() {
        let status = answers.recv().await.unwrap_or_default();
        *statuses.entry(status.to_string()).or_default() += 1;
    }
    let open_seconds = started.elapsed().as_secs_f64();
    let ready =
        json!({ "streams": paths.len(), "statuses": statuses, "open_seconds": open_seconds });
    publish(&args.ready, &ready.to_string())?;
    if let Some(done) = args.done.clone() {
        let streams = paths.len();
        tokio::spawn(async move {
            for _ in 0..streams {
                let _ = settlements.recv().await;
            }
            let _ = publish(&done, "{}");
        });
    }
    let timeout = Duration::from_secs(args.timeout);
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(timeout) => {}
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        let _ = stop.send(true);
    });

    let mut csv = String::new();
    let mut outcomes: BTreeMap<Outcome, usize> = BTreeMap::new();
    let (mut total, mut with_all) = (0, 0);
    for (stream, task) in tasks.into_iter().enumerate() {
        let (outcome, events) = task.await?;
        *outcomes.entry(outcome).or_default() += 1;
        total += events.len();
        with_all += usize::from(events.len() >= args.events);
        for e in events {
            let _ = writeln!(
                csv,
                "{stream},{},{},{},{},{}",
                e.seq, e.id, e.status, e.received_us, e.updated_at
            );
        }
    }
    std::fs::write(&args.out, csv).context("cannot write --out")?;
    let outcomes: BTreeMap<&str, usize> = outcomes
        .into_iter()
        .map(|(outcome, n)| (outcome.name(), n))
        .collect();
    println!(
        "{}",
        json!({
            "streams": paths.len(),
            "statuses": statuses,
            "open_seconds": open_seconds,
            "outcomes": outcomes,
            "events": total,
            "streams_with_all_events": with_all,
            "seconds": started.elapsed().as_secs_f64(),
            "cpu_seconds": cpu_seconds(),
        })
    );
    Ok(())
}
