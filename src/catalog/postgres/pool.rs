//! The PostgreSQL catalog's connections: a small pool that makes connections again by
//! itself after the database went away.
//!
//! * At most [`MAX_OPEN`] connections are open at once (job locks aside, see below); a
//!   caller waits up to [`CHECKOUT_WAIT`] for one to come back, so several instances
//!   stay within the server's `max_connections`.
//! * A connection taken from the pool is checked without a round trip first: the
//!   messages the server sent while it was idle are read, and one that ended the session
//!   (a restart sends `terminating connection due to administrator command`) drops it.
//! * A connection whose session ended during a call (the client is closed then) is
//!   dropped, and so is every idle one (they were to the same server, and most likely
//!   broke the same way): the next call connects afresh, and answers again as soon as
//!   the database does. While it cannot connect, calls fail at once with
//!   [`CatalogError::Unavailable`] (no waiting for a timeout on a refused connection).
//! * Job locks ([`super::maint`]) hold a connection of their own for as long as the
//!   lock is held, outside [`MAX_OPEN`]: a lock held for a long GC never starves the
//!   requests. Those connections are kept in a second idle list once released.

use super::super::{CatalogError, Result};
use ::postgres::{Client, Config, NoTls};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Connections open at once for catalog calls.
const MAX_OPEN: usize = 16;
/// How long a call waits for a connection when [`MAX_OPEN`] are busy.
const CHECKOUT_WAIT: Duration = Duration::from_secs(30);
/// Idle job-lock connections kept.
const MAX_IDLE_LOCKS: usize = 4;

pub(super) struct Pool {
    config: Config,
    state: Mutex<State>,
    freed: Condvar,
    locks: Mutex<Vec<Client>>,
}

struct State {
    idle: Vec<Client>,
    /// Connections handed out or idle.
    open: usize,
}

/// A connection borrowed from the pool, given back (or dropped when it broke) on drop.
pub(super) struct Conn<'a> {
    pool: &'a Pool,
    client: Option<Client>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("client present until drop")
    }
}
impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("client present until drop")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // closed: the session ended (tokio-postgres closes a client on any terminal
        // error of its connection); the idle ones went to the same server
        if client.is_closed() {
            drop(client);
            if let Ok(mut st) = self.pool.state.lock() {
                st.open -= 1;
            }
            self.pool.flush();
            return;
        }
        if let Ok(mut st) = self.pool.state.lock() {
            st.idle.push(client);
        }
        self.pool.freed.notify_one();
    }
}

/// True when `e` says the connection or the server went away (rather than the statement
/// failed): the server is shutting down or starting, refuses connections, or the
/// socket broke.
pub(super) fn is_connection_error(e: &::postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") // connection_exception
            || matches!(
                code,
                "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now (starting up, shutting down)
                | "53300" // too_many_connections
            );
    }
    if e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    let text = e.to_string();
    text.starts_with("error connecting to server")
        || text.contains("timeout waiting for server")
        || text.contains("connection closed")
}

/// `e` as a catalog error, for a failure to connect.
pub(super) fn connect_error(e: ::postgres::Error) -> CatalogError {
    if is_connection_error(&e) {
        CatalogError::Unavailable(format!("cannot connect: {}", words(&e)))
    } else {
        CatalogError::Backend(format!("connecting to the catalog database: {}", words(&e)))
    }
}

/// The error with its causes, on one line.
pub(super) fn words(e: &::postgres::Error) -> String {
    let mut out = e.to_string();
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        source = s.source();
    }
    out
}

impl Pool {
    pub(super) fn new(config: Config) -> Pool {
        Pool {
            config,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            locks: Mutex::new(Vec::new()),
        }
    }

    /// A new session. Its default isolation is READ COMMITTED whatever the database's
    /// (migration 3 makes that SERIALIZABLE for other clients): a change chooses
    /// SERIALIZABLE itself and is retried on a serialization failure, a one-statement
    /// read or append needs neither.
    pub(super) fn connect(&self) -> Result<Client> {
        let mut c = self.config.connect(NoTls).map_err(connect_error)?;
        c.batch_execute("SET default_transaction_isolation = 'read committed'")
            .map_err(connect_error)?;
        Ok(c)
    }

    /// A connection: an idle one that is still alive, else a new one.
    pub(super) fn get(&self) -> Result<Conn<'_>> {
        let deadline = std::time::Instant::now() + CHECKOUT_WAIT;
        let mut st = self.state.lock().map_err(poisoned)?;
        loop {
            while let Some(mut c) = st.idle.pop() {
                if alive(&mut c) {
                    return Ok(Conn {
                        pool: self,
                        client: Some(c),
                    });
                }
                st.open -= 1;
            }
            if st.open < MAX_OPEN {
                st.open += 1;
                drop(st);
                return match self.connect() {
                    Ok(c) => Ok(Conn {
                        pool: self,
                        client: Some(c),
                    }),
                    Err(e) => {
                        let mut st = self.state.lock().map_err(poisoned)?;
                        st.open -= 1;
                        drop(st);
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(CatalogError::Unavailable(format!(
                    "all {MAX_OPEN} catalog connections stayed busy for {}s",
                    CHECKOUT_WAIT.as_secs()
                )));
            }
            st = self
                .freed
                .wait_timeout(st, deadline - now)
                .map_err(poisoned)?
                .0;
        }
    }

    /// Drops every idle connection (after one broke).
    pub(super) fn flush(&self) {
        let dropped = match self.state.lock() {
            Ok(mut st) => {
                let idle = std::mem::take(&mut st.idle);
                st.open -= idle.len();
                idle
            }
            Err(_) => Vec::new(),
        };
        drop(dropped);
        if let Ok(mut l) = self.locks.lock() {
            l.clear();
        }
        self.freed.notify_all();
    }

    /// A connection for a job lock, outside [`MAX_OPEN`].
    pub(super) fn lock_connection(&self) -> Result<Client> {
        let pooled = self.locks.lock().map_err(poisoned)?.pop();
        if let Some(mut c) = pooled {
            if alive(&mut c) {
                return Ok(c);
            }
        }
        self.connect()
    }

    /// Gives back a job-lock connection whose locks were released.
    pub(super) fn return_lock_connection(&self, c: Client) {
        if c.is_closed() {
            return;
        }
        if let Ok(mut l) = self.locks.lock() {
            if l.len() < MAX_IDLE_LOCKS {
                l.push(c);
            }
        }
    }
}

/// Reads what the server sent an idle connection, without a round trip: false when
/// the session ended meanwhile (a restart, an administrator's pg_terminate_backend).
fn alive(c: &mut Client) -> bool {
    if c.is_closed() {
        return false;
    }
    // a terminal message (an error, or the end of the stream) closes the client
    let _ = ::postgres::fallible_iterator::FallibleIterator::next(&mut c.notifications().iter());
    !c.is_closed()
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> CatalogError {
    CatalogError::Backend("the catalog's connection pool lock was poisoned".into())
}
