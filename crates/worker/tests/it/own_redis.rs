//! A Redis server of a test's own. Self-contained (std, redis, uuid and tokio only), so that other test crates
//! can include this file with `#[path]`.

// Each test crate that includes this file uses a part of it.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use uuid::Uuid;

/// A Redis server of this test's own, that the test can stop and start again.
///
/// It listens on a unix socket at a path no one else uses, not on a TCP port: redis-server cannot pick a free
/// port itself (`--port 0` means "no TCP at all"), and a port found free by binding and closing it can be taken
/// by another process before redis-server binds it, or between a stop and the next start. The test would then
/// fail, or worse, talk to someone else's server.
pub struct OwnRedis {
    socket: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl OwnRedis {
    /// A server with redis-server's defaults (`maxmemory-policy noeviction` among them); not started yet.
    pub fn new() -> Self {
        Self::with_args(&[])
    }

    /// A server started with these redis-server arguments as well, such as
    /// `["--maxmemory-policy", "allkeys-lru"]`; not started yet.
    pub fn with_args(args: &[&str]) -> Self {
        Self {
            socket: std::env::temp_dir().join(format!("orders-test-redis-{}.sock", Uuid::new_v4())),
            args: args.iter().map(|&arg| arg.to_owned()).collect(),
            child: None,
        }
    }

    /// Its URL (a unix socket).
    pub fn url(&self) -> String {
        format!("redis+unix://{}?db=0", self.socket.display())
    }

    /// Starts the server (again, after [`OwnRedis::stop`]: empty, since it keeps nothing on disk; a running one is
    /// killed first) and waits until it answers; panics if it does not.
    pub async fn start(&mut self) {
        if let Err(err) = self.try_start().await {
            panic!("{err}");
        }
    }

    /// Like [`OwnRedis::start`], but says why the server did not start (for instance a port in `args` that is
    /// taken: redis-server then exits) instead of panicking.
    pub async fn try_start(&mut self) -> Result<(), String> {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--unixsocket",
                self.socket.to_str().expect("a UTF-8 temporary directory"),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("a Redis URL");
        let started = Instant::now();
        while client
            .get_connection_with_timeout(Duration::from_millis(200))
            .is_err()
        {
            if let Some(exit) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "redis-server {:?} exited at start: {exit}",
                    self.args
                ));
            }
            if started.elapsed() > Duration::from_secs(10) {
                self.stop();
                return Err(format!(
                    "redis-server {:?} did not answer within 10 s",
                    self.args
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
        // A killed redis-server leaves its socket file behind (a restart replaces it).
        let _ = std::fs::remove_file(&self.socket);
    }
}
