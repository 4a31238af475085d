//! The Redis result backend (`redis://`, and `rediss://` with the `redis-tls` feature, on by
//! default), laid out as Go Machinery's: a Go producer can read what a Rust worker wrote and
//! the other way round.
//!
//! Each task state is one string key, the task UUID, holding the [`TaskState`] JSON and
//! written with `SET uuid json EX ResultsExpireIn` on every transition; a group's
//! [`GroupMeta`] JSON is kept the same way under the group UUID. Triggering a chord is atomic
//! and honours the lock Go workers take for it (see
//! [`trigger_chord`](ResultBackend::trigger_chord)).
//!
//! # URLs
//!
//! `redis://[[user]:password@]host[:port][/db]`, as Go Machinery reads them:
//!
//! - `redis://password@host:6379/1`: a lone user-info token is the password (Go's form);
//! - `redis://:password@host` and `redis://user:password@host` (a Redis 6 ACL user);
//! - the port defaults to 6379 and the database to 0 (`/` alone too); user info is
//!   percent-decoded;
//! - `rediss://` connects over TLS with rustls (ring) and the platform's root certificates
//!   (the `redis-tls` feature);
//! - the query and fragment are ignored, as Go ignores them.
//!
//! The password never appears in errors, logs or [`Debug`](fmt::Debug) output.
//!
//! # Redis Sentinel
//!
//! With [`RedisConfig::master_name`] set (Go's `master_name`, `REDIS_MASTER_NAME`), the URL
//! lists the sentinels as Go's does, `redis://[[user]:password@]s1:port,s2:port,.../db`: the
//! password (and user) on the first address are the master's, the database follows the last,
//! and [`RedisConfig::sentinel_password`] (`REDIS_SENTINEL_PASSWORD`) is the sentinels'. The
//! backend asks the sentinels for the master, and asks again when the master connection fails
//! or the server turns read-only (a failover). A write that fails meanwhile is an error the
//! worker retries (`store_retry_timeout`), never a silent loss: when the sentinels know a live
//! replica, each batch of writes is confirmed with `WAIT 1` before it counts (Go does not
//! wait; a write only the old master had would be lost in a failover). Use
//! [`RedisBackend::connect_with`]; [`Server::new`](crate::Server::new) does.
//!
//! # Guarded writes, carrying the task name and creation time forward
//!
//! Every write ([`set_state`](ResultBackend::set_state), [`set_states`](ResultBackend::set_states),
//! [`transition`](ResultBackend::transition), [`start`](ResultBackend::start),
//! [`record`](ResultBackend::record)) is one Lua
//! script run per batch, atomic per task:
//! it reads the stored record, refuses the write when it would move the task backwards (a
//! final state replaced by a non-final one, or PENDING over a task a worker has received:
//! [`ResultBackend::transition`] has the rule), and otherwise writes the new record with
//! `SET uuid json EX ResultsExpireIn`. Go workers write with a plain `SET`; their records are
//! read and guarded the same way, their keys matched case-insensitively as Go's
//! `encoding/json` matches them.
//!
//! Workers record RECEIVED, STARTED, SUCCESS, ... without the task's creation time, and the
//! stored record keeps the name and time of the PENDING record (the
//! [`ResultBackend::set_state`] contract). Go reads the old record and writes the new one in
//! two round trips (`mergeNewTaskState` in `v2/backends/redis/goredis.go`); the script does it
//! atomically in one, without re-encoding JSON. Rust encodes the new state and sends it in
//! five pieces: the JSON before the `TaskName` value, the `TaskName` value, the JSON between
//! it and the `CreatedAt` value, the `CreatedAt` value, and the rest. The script decodes the
//! old record with `cjson.decode`, takes the state and the two strings out of it, quotes the
//! strings as the wire encoder does (Go's `encoding/json` escapes), and writes the pieces joined. Every other byte is the one
//! Rust encoded, so numbers (`8` stays `8`, large integers keep every digit) and key order are
//! exactly those of the wire format. A stored value that is not a JSON object, or whose
//! `State` is none of the six, counts as no record: it is replaced, as Go replaces it.
//!
//! A worker's outcome (RETRY, SUCCESS or FAILURE, through [`record`](ResultBackend::record))
//! is written over the STARTED (or RECEIVED) record its [`start`](ResultBackend::start) wrote
//! by comparison instead: the script is handed that record and the outcome's JSON, the name
//! and creation time already carried from it, and writes the JSON when the store holds exactly
//! that record. The guard never refuses an outcome over such a record, so the bytes are those
//! it would write, and the script neither matches nor joins. When the record has changed (a
//! revoke, a duplicate's outcome, another state written since), nothing is written and the
//! outcome goes through the guard.
//!
//! Single writes ([`set_state`](ResultBackend::set_state), [`transition`](ResultBackend::transition),
//! [`start`](ResultBackend::start), [`record`](ResultBackend::record)) made at the same time, by the tasks a worker runs at once, share runs of the script: one
//! write or batch is in flight per backend (and its clones), and the writes made meanwhile go
//! together in the next run, each with its own answer.
//!
//! # Waiting
//!
//! Redis has no change notification that Go writers trigger, so
//! [`wait_final`](ResultBackend::wait_final) polls; all waiters of a backend (and its clones)
//! share one poller task that reads every waited key with batched `MGET`s, each key on the
//! backoff a waiter of its own would use (at once, then 1 ms, 2 ms, ... up to 100 ms apart),
//! keys on the same step read together. The poller starts with the first waiter and ends
//! with the last; dropping a waiting future withdraws its interest.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Script};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use super::redis_batch::{Batcher, Reply};
use super::redis_conn::{log_target, RedisConn, RedisTarget};
use super::{is_revoked, revoked_over, revoked_state, timeout, ResultBackend};
use crate::config::RedisConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::lock;
use crate::wire::{GoTime, GroupMeta, State, TaskState};

/// Go Machinery's `DefaultResultsExpireIn`, used when the configured expiry is zero.
const DEFAULT_EXPIRY_SECS: u64 = 3600;

/// The most keys one `MGET` asks for; longer lists are read with several, pipelined in one
/// round trip, so that no single command holds the server for long.
const MGET_CHUNK: usize = 1_000;

/// The key of the lock Go workers hold (with redsync) while they trigger a chord.
const GO_CHORD_LOCK: &str = "TriggerChordMutex";

/// How long [`RedisBackend::trigger_chord`] waits for a Go worker's chord lock; redsync's locks
/// expire after 8 s.
const CHORD_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Writes task states, each unless it would move its task backwards, carrying `TaskName` and
/// `CreatedAt` forward from the stored record. A revoke (FAILURE "revoked", passed as the state
/// name `REVOKED`) is written only over a state that is not final, and nothing replaces a
/// stored revoke (see [`allowed`](super::allowed)).
///
/// `KEYS`: the task UUIDs. `ARGV[1]`: expiry in seconds. `ARGV[2]`: `1` to return the stored
/// records. Then, per key, five flag bytes in one argument, and the arguments of its form:
///
/// - the form: `P` (pieces) or `E` (expected);
/// - the new state: `P`ENDING, re`C`EIVED, `S`TARTED, re`T`RY, s`U`CCESS, `F`AILURE, or `R`
///   for a revoke;
/// - carry `TaskName` forward (`1` or `0`), carry `CreatedAt` forward (`1` or `0`);
/// - which record to send back: `0`: the stored one; `1`: the stored one when it is a revoke;
///   `2`: the stored one when it is final, a revoke included; `3`: the record written when it
///   wrote, else as `2`.
///
/// `P`: five arguments follow, the new JSON around the `TaskName` value and the `CreatedAt`
/// value (head, name, mid, created, tail), and the stored record is read and guarded as
/// described. `E` (RETRY, SUCCESS and FAILURE only): two arguments follow, a record and a
/// JSON: when the stored record is exactly that record, the JSON is written as it is (a
/// worker's outcome over the STARTED record it wrote, so the guard is known to allow it and
/// the caller has applied the carry); otherwise nothing is written and the reply is `2`, for
/// the caller to write it again in the `P` form.
///
/// Every write's flags (and the number of arguments) are checked before anything is written;
/// a run with one bad write is an error and writes nothing.
///
/// Returns, per key, `1` when it wrote, `0` when it refused, `-1` when the key holds a value
/// of another type than a string (left alone) and `2` when an `E` record did not match; with
/// `ARGV[2]` = `1`, also a record (the stored one, as the flag says, or the written one for
/// `3`; nil otherwise) and the state name the guard read from the stored record (nil when
/// there is no record, or it is not JSON or has a state that is none of the six, and for `E`).
///
/// The flags are one argument, read with one `string.byte`, and `E` neither matches nor
/// joins: these are where the script's time goes besides its `GET` and `SET` (README,
/// "Outcomes written by comparison").
const WRITE_STATES_LUA: &str = r#"
local escapes = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
                  ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t',
                  ['<'] = '\\u003c', ['>'] = '\\u003e', ['&'] = '\\u0026' }
local function quote(s)
  local body = string.gsub(s, '[%z\1-\31"\\<>&]', function(c)
    return escapes[c] or string.format('\\u%04x', string.byte(c))
  end)
  body = string.gsub(body, '\226\128\168', '\\u2028')
  body = string.gsub(body, '\226\128\169', '\\u2029')
  return '"' .. body .. '"'
end
local function field(record, key)
  local v = record[key]
  if v == nil then
    local lower = string.lower(key)
    for k, candidate in pairs(record) do
      if type(k) == 'string' and string.lower(k) == lower then
        return candidate
      end
    end
  end
  return v
end
local function carried(record, key)
  local v = field(record, key)
  if type(v) == 'string' and v ~= '' then
    return quote(v)
  end
  return nil
end
local plain = '([^"\\%c<>&\128-\255]*)'
local FAST = '^{"TaskUUID":"[^"\\%c]*","TaskName":"' .. plain .. '","State":"(%u*)",' ..
             '"Results":null,"Error":"' .. plain .. '","CreatedAt":"' .. plain .. '"(.*)$'
local kinds = { [''] = 'pending', PENDING = 'pending', RETRY = 'retry', RECEIVED = 'running',
                STARTED = 'running', SUCCESS = 'final', FAILURE = 'final' }
-- The state named by the second flag byte.
local states = { [80] = 'PENDING', [67] = 'RECEIVED', [83] = 'STARTED', [84] = 'RETRY',
                 [85] = 'SUCCESS', [70] = 'FAILURE', [82] = 'REVOKED' }
local expiry, keep = ARGV[1], ARGV[2] == '1'
-- Every write's flags are checked before anything is written.
local outcomes = { [84] = true, [85] = true, [70] = true }
local a = 3
for _ = 1, #KEYS do
  local flags = ARGV[a] or ''
  local form, code, carryname, carrycreated, back = string.byte(flags, 1, 5)
  local ok = #flags == 5 and states[code] and (carryname == 48 or carryname == 49)
             and (carrycreated == 48 or carrycreated == 49) and back >= 48 and back <= 51
  if ok and form == 69 then
    ok = outcomes[code]
    a = a + 3
  elseif ok and form == 80 then
    a = a + 6
  else
    ok = false
  end
  if not ok then return redis.error_reply('ERR bad state flags') end
end
if a - 1 ~= #ARGV then return redis.error_reply('ERR bad state arguments') end
local out, o = {}, 0
a = 3
for _, key in ipairs(KEYS) do
  local form, code, carryname, carrycreated, back = string.byte(ARGV[a], 1, 5)
  local nxt = states[code]
  if form == 69 then
    -- E: the stored record is the one given, or nothing is written.
    local expected, json = ARGV[a + 1], ARGV[a + 2]
    a = a + 3
    local old = redis.pcall('GET', key)
    local written = 2
    if old == expected then
      redis.call('SET', key, json, 'EX', expiry)
      written = 1
    end
    o = o + 1
    out[o] = written
    if keep then
      out[o + 1] = (back == 51 and written == 1) and json or false
      out[o + 2] = false
      o = o + 2
    end
  else
    local head, name, mid, created, tail = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
                                           ARGV[a + 5]
    a = a + 6
    local old = redis.pcall('GET', key)
    -- A key of another type (a list, a hash) is no task state: this write fails alone and the
    -- key is left as it is.
    local wrong = type(old) == 'table' and old.err ~= nil
    if wrong then old = false end
    -- What the guard reads from the stored record: its state, its error, and its TaskName and
    -- CreatedAt as JSON strings (nil when empty or absent).
    local stored, olderror, oldname, oldcreated = nil, nil, nil, nil
    if old then
      -- The common case first: a record in the layout of Go's TaskState and of ours, with no
      -- results, a name, error and creation time of plain printable ASCII and a JSON integer
      -- TTL, read without decoding it. Anything else is decoded.
      local n, st, e, c, tl = string.match(old, FAST)
      if n and kinds[st] and (tl == '}' or string.match(tl, '^,"TTL":%-?0}$')
                              or string.match(tl, '^,"TTL":%-?[1-9]%d*}$')) then
        stored, olderror = st, e
        if n ~= '' then oldname = '"' .. n .. '"' end
        if c ~= '' then oldcreated = '"' .. c .. '"' end
      else
        local ok, decoded = pcall(cjson.decode, old)
        if ok and type(decoded) == 'table' then
          local state = field(decoded, 'State')
          if state == nil or state == cjson.null then state = '' end
          if type(state) == 'string' and kinds[state] then
            stored, olderror = state, field(decoded, 'Error')
            oldname, oldcreated = carried(decoded, 'TaskName'), carried(decoded, 'CreatedAt')
          end
        end
      end
    end
    local kind = stored and kinds[stored]
    if stored == 'FAILURE' and olderror == 'revoked' then kind = 'revoked' end
    local allowed = true
    if kind == 'revoked' then
      allowed = false
    elseif nxt == 'REVOKED' then
      allowed = kind ~= 'final'
    elseif kind == 'final' then
      allowed = nxt == 'SUCCESS' or nxt == 'FAILURE'
    elseif kind and nxt == 'PENDING' then
      allowed = kind == 'pending' or kind == 'retry'
    end
    if wrong then allowed = false end
    local value = false
    if allowed then
      if carryname == 49 then name = oldname or name end
      if carrycreated == 49 then created = oldcreated or created end
      value = head .. name .. mid .. created .. tail
      redis.call('SET', key, value, 'EX', expiry)
    end
    o = o + 1
    out[o] = wrong and -1 or (allowed and 1 or 0)
    if keep then
      local send = back == 48 or kind == 'revoked' or (back >= 50 and kind == 'final')
      if back == 51 and allowed then
        out[o + 1] = value
      elseif send then
        out[o + 1] = old
      else
        out[o + 1] = false
      end
      out[o + 2] = stored or false
      o = o + 2
    end
  end
end
return out
"#;

/// How many states one run of [`WRITE_STATES_LUA`] writes; larger batches run it several times,
/// pipelined in one round trip, so that no single run holds the server for long.
const WRITE_CHUNK: usize = 500;

/// Sets `ChordTriggered` in a group's record unless it is set, or a Go worker holds its lock.
///
/// `KEYS[1]`: the group UUID. `KEYS[2]`: Go's chord lock. `ARGV[1]`: expiry in seconds.
/// Returns 1 when this call set the flag, 0 when it was set, -1 while the lock is held, -2
/// when there is no record and -3 when the record is not in the wire format's layout.
const TRIGGER_CHORD_LUA: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local meta = redis.call('GET', KEYS[1])
if not meta then return -2 end
if string.find(meta, '"ChordTriggered":true', 1, true) then return 0 end
local s, e = string.find(meta, '"ChordTriggered":false', 1, true)
if not s then return -3 end
local updated = string.sub(meta, 1, s - 1) .. '"ChordTriggered":true' .. string.sub(meta, e + 1)
redis.call('SET', KEYS[1], updated, 'EX', ARGV[1])
return 1
"#;

/// A Redis result backend; see the [module docs](self).
///
/// Cheap to clone; clones share one multiplexed connection, which reconnects by itself.
#[derive(Clone)]
pub struct RedisBackend {
    conn: RedisConn,
    expiry_secs: u64,
    /// The URL without its password, for messages.
    display: String,
    /// How long one operation may take (Go's `read_timeout`, default 15 s).
    response_timeout: Duration,
    write_states_script: Script,
    trigger_chord_script: Script,
    /// Everyone waiting in [`wait_final`](ResultBackend::wait_final), shared by clones.
    waiters: Arc<Waiters>,
    /// Single state writes waiting to share a script run, shared by clones.
    batcher: Arc<Batcher>,
    /// The STARTED records `start` wrote, until their tasks' outcomes, shared by clones.
    started: Arc<Started>,
}

impl RedisBackend {
    /// Connects to the Redis server at `url` (see the [module docs](self) for the forms),
    /// keeping states for `ttl` (whole seconds, rounded up; zero means Go's default, one hour).
    ///
    /// Fails with [`ErrorKind::Config`] for a URL it cannot read and [`ErrorKind::Backend`]
    /// when the server cannot be reached or refuses the credentials.
    pub async fn connect(url: &str, ttl: Duration) -> Result<RedisBackend> {
        RedisBackend::connect_with(url, ttl, &RedisConfig::default()).await
    }

    /// Like [`connect`](Self::connect), with the settings of Go's `redis:` block: a Redis
    /// Sentinel deployment when [`master_name`](RedisConfig::master_name) is set (the URL
    /// then lists the sentinels, see [Redis Sentinel](self#redis-sentinel)), and its
    /// `connect_timeout` and `read_timeout`. [`Server::new`](crate::Server::new) connects
    /// with [`Config::redis`](crate::Config).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use machinery::backend::redis::RedisBackend;
    /// use machinery::config::RedisConfig;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let mut redis = RedisConfig::default();
    /// redis.master_name = "mymaster".into();
    /// redis.sentinel_password = "sentinel-secret".into();
    /// let backend = RedisBackend::connect_with(
    ///     "redis://secret@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/0",
    ///     Duration::from_secs(3600),
    ///     &redis,
    /// )
    /// .await?;
    /// # drop(backend);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_with(
        url: &str,
        ttl: Duration,
        redis: &RedisConfig,
    ) -> Result<RedisBackend> {
        let target = RedisTarget::parse(url, redis)?;
        log_target(&target, "result backend");
        let conn = target.connect("Redis").await?;
        Ok(RedisBackend {
            conn,
            expiry_secs: expiry_secs(ttl),
            display: target.display().to_owned(),
            response_timeout: target.response_timeout(),
            write_states_script: Script::new(WRITE_STATES_LUA),
            trigger_chord_script: Script::new(TRIGGER_CHORD_LUA),
            waiters: Arc::default(),
            batcher: Arc::default(),
            started: Arc::default(),
        })
    }

    /// The states of a group's members, in the group's order (`None` where a member has no
    /// stored state). Fails when the group has no record.
    pub async fn group_task_states(&self, group_uuid: &str) -> Result<Vec<Option<TaskState>>> {
        let meta = self.group_meta(group_uuid).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Backend,
                format!("group {group_uuid} is not stored"),
            )
        })?;
        self.get_states(&meta.task_uuids).await
    }

    /// Whether `group_task_count` members of the group have finished (Go's `GroupCompleted`).
    pub async fn group_completed(&self, group_uuid: &str, group_task_count: usize) -> Result<bool> {
        let states = self.group_task_states(group_uuid).await?;
        let finished = states
            .iter()
            .flatten()
            .filter(|s| s.state.is_final())
            .count();
        Ok(finished == group_task_count)
    }

    /// Deletes a group's record (Go's `PurgeGroupMeta`).
    pub async fn purge_group_meta(&self, group_uuid: &str) -> Result<()> {
        self.query::<()>(redis::cmd("DEL").arg(group_uuid), "delete group")
            .await
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd, what: &str) -> Result<T> {
        let mut conn = self.conn.clone();
        self.bounded(what, cmd.query_async(&mut conn)).await
    }

    /// Runs [`WRITE_STATES_LUA`] over `states`, [`WRITE_CHUNK`] per run, the runs pipelined
    /// in one round trip; the script's replies, concatenated in order.
    async fn write_states(
        &self,
        states: &[TaskState],
        keep: bool,
        what: &str,
    ) -> Result<Vec<redis::Value>> {
        let encoded = states
            .iter()
            .map(Encoded::new)
            .collect::<Result<Vec<_>>>()?;
        self.write_encoded(&encoded, keep, what).await
    }

    /// [`write_states`](Self::write_states) of states already encoded.
    pub(super) async fn write_encoded(
        &self,
        states: &[Encoded],
        keep: bool,
        what: &str,
    ) -> Result<Vec<redis::Value>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for chunk in states.chunks(WRITE_CHUNK) {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.write_states_script.get_hash())
                .arg(chunk.len());
            for state in chunk {
                cmd.arg(&state.uuid);
            }
            cmd.arg(self.expiry_secs).arg(if keep { "1" } else { "0" });
            for state in chunk {
                cmd.arg(&state.flags[..]);
                match &state.form {
                    Form::Pieces(pieces) => {
                        for part in pieces.parts() {
                            cmd.arg(part);
                        }
                    }
                    Form::Expected { expected, json } => {
                        cmd.arg(&expected[..]).arg(&json[..]);
                    }
                }
            }
        }
        let mut conn = self.conn.clone();
        let run = async {
            let replies = match pipe.query_async::<Vec<Vec<redis::Value>>>(&mut conn).await {
                // A server that restarted (or ran SCRIPT FLUSH), or a replica promoted by
                // Sentinel, has not got the script: load it and run the batch again (the
                // writes are idempotent).
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.write_states_script
                        .prepare_invoke()
                        .load_async(&mut conn)
                        .await?;
                    pipe.query_async::<Vec<Vec<redis::Value>>>(&mut conn).await
                }
                other => other,
            }?;
            // Under Sentinel: a replica has them, or the writes fail (see RedisConn::confirm).
            conn.confirm().await?;
            Ok(replies)
        };
        let replies: Vec<redis::Value> = self
            .bounded(what, run)
            .await?
            .into_iter()
            .flatten()
            .collect();
        let expected = states.len() * if keep { 3 } else { 1 };
        if replies.len() != expected {
            return Err(self.unexpected_reply(what));
        }
        Ok(replies)
    }

    /// The stored record the write script returned (`old`, and the state name it read from
    /// it): `None` when there was none, or the script counted it as none (not JSON, an
    /// unknown state); only its UUID and state when it does not decode as a state.
    fn previous(
        &self,
        uuid: &str,
        old: redis::Value,
        stored: redis::Value,
        what: &str,
    ) -> Result<Option<TaskState>> {
        match (old, stored) {
            (redis::Value::Nil, _) => Ok(None),
            (redis::Value::BulkString(raw), stored) => match decode_state(uuid, &raw) {
                Ok(previous) => Ok(Some(previous)),
                Err(e) => {
                    let stored = match stored {
                        redis::Value::BulkString(name) => {
                            std::str::from_utf8(&name).ok().and_then(State::parse)
                        }
                        _ => None,
                    };
                    warn!(task = %uuid, error = %e, state = ?stored, "the stored record is not a task state");
                    Ok(stored.map(|stored| TaskState::new(uuid, stored)))
                }
            },
            _ => Err(self.unexpected_reply(what)),
        }
    }

    /// One state through the guarded write script, in a run shared with the writes made at the
    /// same time (see [`Batcher`]), with the stored records `back` names sent back: whether it
    /// wrote, the stored record and the state name the script read. A key of another type is
    /// an error ([`check_written`](Self::check_written)).
    async fn write_one(&self, state: &TaskState, back: Back) -> Result<Reply> {
        self.write_encoded_one(&state.task_uuid, Encoded::with(state, back)?)
            .await
    }

    /// [`write_one`](Self::write_one) of a state already encoded, of the task `uuid`.
    async fn write_encoded_one(&self, uuid: &str, encoded: Encoded) -> Result<Reply> {
        let reply = self.batcher.write(self, encoded).await?;
        self.check_written(uuid, &reply[0])?;
        Ok(reply)
    }

    /// A worker's outcome over the STARTED record its [`start`](ResultBackend::start) wrote,
    /// by comparison ([`Encoded::over_started`]); `None` when there is no such record here,
    /// the outcome cannot be written so, or the store no longer holds that record (then the
    /// guarded write decides, as for any other write).
    async fn write_over_started(&self, state: &TaskState, back: Back) -> Result<Option<Reply>> {
        let Some(started) = self.started.take(&state.task_uuid) else {
            return Ok(None);
        };
        let Some(encoded) = Encoded::over_started(state, started, back)? else {
            return Ok(None);
        };
        let reply = self.write_encoded_one(&state.task_uuid, encoded).await?;
        if reply[0] == redis::Value::Int(2) {
            debug!(task = %state.task_uuid, "the stored record changed since STARTED; the outcome goes through the guard");
            return Ok(None);
        }
        Ok(Some(reply))
    }

    /// An error for a write the script refused because `uuid` names a key of another type
    /// (which no retry cures).
    fn check_written(&self, uuid: &str, written: &redis::Value) -> Result<()> {
        if *written != redis::Value::Int(-1) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "Redis at {}: cannot store the state of task {uuid}: the key holds a value that is not a task state (another type)",
                self.display
            ),
        ))
    }

    pub(super) fn unexpected_reply(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Backend,
            format!("Redis at {}: cannot {what}: unexpected reply", self.display),
        )
    }

    /// The raw values at `keys`, in order: `MGET`, in chunks of [`MGET_CHUNK`] keys pipelined
    /// in one round trip.
    async fn mget(&self, keys: &[String], what: &str) -> Result<Vec<Option<Vec<u8>>>> {
        match keys.len() {
            0 => Ok(Vec::new()),
            n if n <= MGET_CHUNK => self.query(redis::cmd("MGET").arg(keys), what).await,
            _ => {
                let mut pipe = redis::pipe();
                for chunk in keys.chunks(MGET_CHUNK) {
                    pipe.cmd("MGET").arg(chunk);
                }
                let mut conn = self.conn.clone();
                let chunks: Vec<Vec<Option<Vec<u8>>>> =
                    self.bounded(what, pipe.query_async(&mut conn)).await?;
                Ok(chunks.into_iter().flatten().collect())
            }
        }
    }

    /// Runs one Redis operation, failing with [`ErrorKind::Backend`] when it fails or takes
    /// longer than the response timeout (a server that is down or unreachable: the connection
    /// manager re-dials it meanwhile, and the next operation uses the new connection).
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.response_timeout, op).await {
            Ok(outcome) => outcome.map_err(|e| self.error(what, e)),
            Err(_) => Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "Redis at {}: cannot {what}: no reply within {:?}",
                    self.display, self.response_timeout
                ),
            )),
        }
    }

    fn error(&self, what: &str, e: redis::RedisError) -> Error {
        backend_error(format!("Redis at {}: cannot {what}", self.display), e)
    }
}

/// How long after its last read a waited key is read again, by step: at once, then 1 ms, 2 ms,
/// ... 64 ms later, then every 100 ms (the backoff a lone waiter polling `GET` used).
const WAIT_STEPS: [Duration; 9] = [
    Duration::ZERO,
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
    Duration::from_millis(64),
    Duration::from_millis(100),
];

type Answer = oneshot::Sender<Result<TaskState>>;

/// The keys waited on, shared by a backend and its clones, and the poller that reads them.
#[derive(Default)]
struct Waiters {
    table: Mutex<WaitTable>,
    /// Tells the poller that a key was added.
    added: Notify,
}

/// The waited keys, in slots that the poller's rounds address by index (no hashing per read).
#[derive(Default)]
struct WaitTable {
    /// Key -> slot, for adding and withdrawing waiters.
    index: HashMap<String, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// The slots on each step of [`WAIT_STEPS`], as (slot, tag): an entry whose slot was
    /// freed or reused (another tag), or moved on, is stale and skipped.
    steps: [Vec<(usize, u64)>; WAIT_STEPS.len()],
    /// When each step was last read.
    read_at: [Option<Instant>; WAIT_STEPS.len()],
    /// Tags slots as they are filled, and numbers waiters.
    next_tag: u64,
    /// The running poller's number, if one runs.
    poller: Option<u64>,
    pollers: u64,
    /// Counts the poller's rounds.
    round: u64,
}

#[derive(Default)]
struct Slot {
    key: String,
    /// Zero while the slot is free.
    tag: u64,
    step: usize,
    /// The round that last read it.
    round: u64,
    waiters: Vec<(u64, Answer)>,
    /// The value last read, which was not final: the same bytes need no decoding.
    last: Option<Vec<u8>>,
}

impl WaitTable {
    /// The slot of a key that is read, if it is still the same one (same tag).
    fn live(&mut self, slot: usize, tag: u64) -> Option<&mut Slot> {
        self.slots.get_mut(slot).filter(|s| s.tag == tag)
    }

    /// Frees a slot, returning its waiters.
    fn release(&mut self, slot: usize) -> Vec<(u64, Answer)> {
        let Some(s) = self.slots.get_mut(slot) else {
            return Vec::new();
        };
        let freed = std::mem::take(s);
        self.index.remove(&freed.key);
        self.free.push(slot);
        freed.waiters
    }

    fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
        self.free.clear();
        self.steps = Default::default();
    }
}

/// A waiter's interest in a key; dropping it withdraws the interest.
struct Interest {
    waiters: Arc<Waiters>,
    key: String,
    id: u64,
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut table = lock(&self.waiters.table);
        let Some(&slot) = table.index.get(&self.key) else {
            return;
        };
        let Some(s) = table.slots.get_mut(slot) else {
            return;
        };
        s.waiters.retain(|(id, _)| *id != self.id);
        if s.waiters.is_empty() {
            table.release(slot);
        }
    }
}

/// Ends a poller's watch: when the poller stops without having left cleanly (its runtime shut
/// down), every waiter's answer is dropped, so the waiters watch again and start a new one.
struct PollerGuard {
    waiters: Arc<Waiters>,
    number: u64,
}

impl Drop for PollerGuard {
    fn drop(&mut self) {
        let mut table = lock(&self.waiters.table);
        if table.poller == Some(self.number) {
            table.poller = None;
            table.clear();
        }
    }
}

/// One round's reads: the keys' slots and tags, and the `MGET`s that read them.
struct Round {
    slots: Vec<(usize, u64)>,
    pipe: redis::Pipeline,
}

impl RedisBackend {
    /// Adds a waiter on `key`, starting the poller if none runs.
    fn watch(&self, key: &str) -> Result<(oneshot::Receiver<Result<TaskState>>, Interest)> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::new(
                ErrorKind::Unsupported,
                "waiting for a result in Redis needs a Tokio runtime",
            )
        })?;
        let (answer, receiver) = oneshot::channel();
        let (id, start) = {
            let mut guard = lock(&self.waiters.table);
            let table = &mut *guard;
            table.next_tag += 1;
            let id = table.next_tag;
            match table.index.get(key) {
                Some(&slot) => match table.slots.get_mut(slot) {
                    Some(s) => s.waiters.push((id, answer)),
                    None => return Err(self.unexpected_reply("wait")),
                },
                None => {
                    let filled = Slot {
                        key: key.to_owned(),
                        tag: id,
                        waiters: vec![(id, answer)],
                        ..Slot::default()
                    };
                    let slot = match table.free.pop() {
                        Some(slot) => slot,
                        None => {
                            table.slots.push(Slot::default());
                            table.slots.len() - 1
                        }
                    };
                    if let Some(s) = table.slots.get_mut(slot) {
                        *s = filled;
                    }
                    table.index.insert(key.to_owned(), slot);
                    table.steps[0].push((slot, id));
                }
            }
            let start = table.poller.is_none().then(|| {
                table.pollers += 1;
                table.poller = Some(table.pollers);
                table.pollers
            });
            (id, start)
        };
        let interest = Interest {
            waiters: self.waiters.clone(),
            key: key.to_owned(),
            id,
        };
        match start {
            Some(number) => {
                let guard = PollerGuard {
                    waiters: self.waiters.clone(),
                    number,
                };
                runtime.spawn(self.clone().poll(guard));
            }
            None => self.waiters.added.notify_one(),
        }
        Ok((receiver, interest))
    }

    /// The poller: reads the keys that are due, answers the waiters of those that are final,
    /// sleeps until the next step is due or a key is added; ends when no one waits.
    async fn poll(self, guard: PollerGuard) {
        debug!(poller = guard.number, "polling Redis for waited results");
        loop {
            let Some(round) = self.due(guard.number) else {
                debug!(poller = guard.number, "no one waits; polling stops");
                return;
            };
            if !round.slots.is_empty() {
                trace!(keys = round.slots.len(), "reading waited keys");
                let mut conn = self.conn.clone();
                let read = self
                    .bounded(
                        "read task states",
                        round
                            .pipe
                            .query_async::<Vec<Vec<Option<Vec<u8>>>>>(&mut conn),
                    )
                    .await
                    .map(|chunks| chunks.into_iter().flatten().collect());
                self.answer(round.slots, read);
            }
            let next = self.next_due();
            let added = self.waiters.added.notified();
            match next {
                Some(next) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => {}
                        _ = added => {}
                    }
                }
                None => added.await,
            }
        }
    }

    /// The keys to read now (each moved to its next step), or `None`, the poller leaving,
    /// when no one waits.
    fn due(&self, number: u64) -> Option<Round> {
        let mut guard = lock(&self.waiters.table);
        let table = &mut *guard;
        if table.index.is_empty() {
            if table.poller == Some(number) {
                table.poller = None;
            }
            table.clear();
            return None;
        }
        let now = Instant::now();
        let mut round = Round {
            slots: Vec::new(),
            pipe: redis::pipe(),
        };
        let due = |step: usize, table: &WaitTable, pause: Duration| {
            !table.steps[step].is_empty() && table.read_at[step].is_none_or(|at| at + pause <= now)
        };
        if !(0..WAIT_STEPS.len()).any(|step| due(step, table, WAIT_STEPS[step])) {
            return Some(round);
        }
        table.round += 1;
        let number = table.round;
        let mut mget: Option<redis::Cmd> = None;
        let mut in_mget = 0;
        // From the top step down, so that a key moved up is not read twice. Steps due within
        // half their pause are read with the rest: fewer, larger rounds.
        for step in (0..WAIT_STEPS.len()).rev() {
            if !due(step, table, WAIT_STEPS[step] / 2) {
                continue;
            }
            table.read_at[step] = Some(now);
            let next = (step + 1).min(WAIT_STEPS.len() - 1);
            for (slot, tag) in std::mem::take(&mut table.steps[step]) {
                let Some(s) = table.live(slot, tag) else {
                    continue;
                };
                if s.step != step || s.round == number {
                    continue;
                }
                s.step = next;
                s.round = number;
                let cmd = mget.get_or_insert_with(|| redis::cmd("MGET"));
                cmd.arg(s.key.as_str());
                in_mget += 1;
                if in_mget == MGET_CHUNK {
                    if let Some(full) = mget.take() {
                        round.pipe.add_command(full);
                    }
                    in_mget = 0;
                }
                if table.steps[next].is_empty() {
                    // Its keys were all read just now.
                    table.read_at[next] = Some(now);
                }
                table.steps[next].push((slot, tag));
                round.slots.push((slot, tag));
            }
        }
        if let Some(rest) = mget {
            round.pipe.add_command(rest);
        }
        Some(round)
    }

    /// When the next step is due, if any key waits.
    fn next_due(&self) -> Option<Instant> {
        let table = lock(&self.waiters.table);
        (0..WAIT_STEPS.len())
            .filter(|&step| !table.steps[step].is_empty())
            .map(|step| match table.read_at[step] {
                Some(at) => at + WAIT_STEPS[step],
                None => Instant::now(),
            })
            .min()
    }

    /// Answers the waiters of the keys that were read final (or undecodable), or of every key
    /// read when the read failed.
    fn answer(&self, slots: Vec<(usize, u64)>, read: Result<Vec<Option<Vec<u8>>>>) {
        let values = match read {
            Ok(values) if values.len() == slots.len() => values,
            Ok(_) => return self.fail(&slots, &self.unexpected_reply("read task states")),
            Err(e) => return self.fail(&slots, &e),
        };
        // Decode outside the lock, skipping values seen (not final) before.
        let mut read = Vec::with_capacity(slots.len());
        {
            let mut table = lock(&self.waiters.table);
            for (&(slot, tag), value) in slots.iter().zip(values) {
                let Some(value) = value else { continue };
                let Some(s) = table.live(slot, tag) else {
                    continue;
                };
                if s.last.as_deref() != Some(value.as_slice()) {
                    read.push((slot, tag, s.key.clone(), value));
                }
            }
        }
        if read.is_empty() {
            return;
        }
        let mut finished = Vec::new();
        let mut pending = Vec::new();
        for (slot, tag, key, value) in read {
            match decode_state(&key, &value) {
                Ok(state) if state.state.is_final() => finished.push((slot, tag, Ok(state))),
                Ok(_) => pending.push((slot, tag, value)),
                Err(e) => finished.push((slot, tag, Err(e))),
            }
        }
        let mut table = lock(&self.waiters.table);
        for (slot, tag, value) in pending {
            if let Some(s) = table.live(slot, tag) {
                s.last = Some(value);
            }
        }
        for (slot, tag, outcome) in finished {
            if table.live(slot, tag).is_some() {
                for (_, answer) in table.release(slot) {
                    let _ = answer.send(copy(&outcome));
                }
            }
        }
    }

    fn fail(&self, slots: &[(usize, u64)], error: &Error) {
        warn!(keys = slots.len(), error = %error, "cannot read waited results");
        let mut table = lock(&self.waiters.table);
        for &(slot, tag) in slots {
            if table.live(slot, tag).is_some() {
                for (_, answer) in table.release(slot) {
                    let _ = answer.send(Err(Error::new(error.kind(), error.message())));
                }
            }
        }
    }
}

fn copy(outcome: &Result<TaskState>) -> Result<TaskState> {
    match outcome {
        Ok(state) => Ok(state.clone()),
        Err(e) => Err(Error::new(e.kind(), e.message())),
    }
}

fn backend_error(message: String, e: redis::RedisError) -> Error {
    Error::with_source(ErrorKind::Backend, format!("{message}: {e}"), e)
}

fn decode_state(uuid: &str, raw: &[u8]) -> Result<TaskState> {
    serde_json::from_slice(raw).map_err(|e| Error::decode(format!("state of task {uuid}: {e}")))
}

/// Whole seconds, rounded up; zero becomes Go's default.
fn expiry_secs(ttl: Duration) -> u64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    if secs == 0 {
        DEFAULT_EXPIRY_SECS
    } else {
        secs
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.display)
            .field("expiry_secs", &self.expiry_secs)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    /// The guarded write script (see the [module docs](self)), in a run shared with the
    /// writes made at the same time by other tasks: one round trip.
    async fn set_state(&self, state: TaskState) -> Result<()> {
        self.write_one(&state, Back::Revoke).await.map(drop)
    }

    /// Every state through the guarded write script, 500 per run, the runs pipelined: one
    /// round trip. States of the same task are written in order.
    async fn set_states(&self, states: Vec<TaskState>) -> Result<()> {
        self.write_states(&states, false, "store task states")
            .await
            .map(drop)
    }

    /// The guarded write script, which also returns the stored record, in a run shared with
    /// the writes made at the same time by other tasks: one round trip. A
    /// stored record that the script counted as no record (not JSON, an unknown state) is
    /// returned as `None`; one whose state it read but which does not decode as a state is
    /// returned with only its UUID and state.
    async fn transition(&self, state: TaskState) -> Result<Option<TaskState>> {
        let [written, old, stored] = self.write_one(&state, Back::All).await?;
        let uuid = &state.task_uuid;
        let previous = self.previous(uuid, old, stored, "record task state")?;
        if written == redis::Value::Int(0) {
            debug!(task = %uuid, state = %state.state, previous = ?previous.as_ref().map(|p| p.state), "refused a backward transition");
        }
        Ok(previous)
    }

    /// [`transition`](Self::transition), with the stored record sent back only when it is
    /// final (the worker's STARTED would otherwise carry every task's PENDING record back, to
    /// be parsed and decoded for its state alone); for any other, the state name the script
    /// read stands for it. A stored value that is not a state is replaced and reported as
    /// nothing stored, as `transition` does, without `transition`'s warning (the script's
    /// reply does not tell it from no record).
    ///
    /// The record it wrote is kept until the task's [`record`](ResultBackend::record), which
    /// then writes the outcome over it by comparison (see the [module docs](self)).
    async fn start(&self, state: TaskState) -> Result<Option<TaskState>> {
        // Only a STARTED or RECEIVED record is kept: only over one of these is an outcome never
        // refused (and these are written only over a state that is not final, so the record
        // sent back when one is written is always the one written).
        let keep = matches!(state.state, State::Started | State::Received) && !is_revoked(&state);
        let back = if keep {
            Back::FinalOrWritten
        } else {
            Back::Final
        };
        let [written, old, stored] = self.write_one(&state, back).await?;
        let uuid = &state.task_uuid;
        if keep && written == redis::Value::Int(1) {
            // It wrote over a state that is not final: the record sent back is the one
            // written, not a stored one.
            if let redis::Value::BulkString(record) = old {
                self.started.put(uuid, record);
            }
        } else {
            // A record kept from an earlier start of the task is stale now.
            drop(self.started.take(uuid));
            if written == redis::Value::Int(0) {
                debug!(task = %uuid, state = %state.state, "refused a backward transition");
            }
            if old != redis::Value::Nil {
                return self.previous(uuid, old, stored, "record task state");
            }
        }
        match stored {
            redis::Value::Nil => Ok(None),
            redis::Value::BulkString(name) => {
                match std::str::from_utf8(&name).ok().and_then(State::parse) {
                    Some(stored) => Ok(Some(TaskState::new(uuid, stored))),
                    None => Err(self.unexpected_reply("record task state")),
                }
            }
            _ => Err(self.unexpected_reply("record task state")),
        }
    }

    /// [`transition`](Self::transition) as a lean write: the script sends back the stored
    /// record only when it is a revoke (a worker's SUCCESS would otherwise carry its STARTED
    /// record back, to be parsed and dropped).
    ///
    /// A record sent back is a revoke by construction: one that does not decode as a state
    /// still counts as one.
    ///
    /// Over the STARTED record this backend's [`start`](ResultBackend::start) wrote for the
    /// task, when the store still holds it, the outcome is written by comparison, without the
    /// guard reading the record (see the [module docs](self)): the same bytes, for less of
    /// Redis's time.
    async fn record(&self, state: TaskState) -> Result<Option<TaskState>> {
        let [written, old, stored] = match self.write_over_started(&state, Back::Revoke).await? {
            Some(reply) => reply,
            None => self.write_one(&state, Back::Revoke).await?,
        };
        let uuid = &state.task_uuid;
        let revoked = old != redis::Value::Nil;
        if written == redis::Value::Int(0) {
            debug!(task = %uuid, state = %state.state, revoked, "the outcome was refused (a revoke, or a final state, is stored)");
        }
        let previous = self.previous(uuid, old, stored, "record task state")?;
        Ok(revoked.then(|| {
            previous
                .filter(is_revoked)
                .unwrap_or_else(|| revoked_state(uuid))
        }))
    }

    /// The guarded write script over the whole batch, 500 per run, the runs pipelined: one
    /// round trip. Go's readers see FAILURE with the error "revoked", expiring with the
    /// results.
    async fn revoke(&self, task_uuids: &[String]) -> Result<Vec<bool>> {
        const WHAT: &str = "revoke tasks";
        let states: Vec<TaskState> = task_uuids.iter().map(|u| revoked_state(u)).collect();
        let mut replies = self.write_states(&states, true, WHAT).await?.into_iter();
        let mut revoked = Vec::with_capacity(task_uuids.len());
        for uuid in task_uuids {
            let (Some(written), Some(old), Some(stored)) =
                (replies.next(), replies.next(), replies.next())
            else {
                return Err(self.unexpected_reply(WHAT));
            };
            let previous = self.previous(uuid, old, stored, WHAT)?;
            revoked.push(written == redis::Value::Int(1) || revoked_over(previous.as_ref()));
        }
        Ok(revoked)
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>> {
        let raw: Option<Vec<u8>> = self
            .query(redis::cmd("GET").arg(task_uuid), "read task state")
            .await?;
        raw.map(|raw| decode_state(task_uuid, &raw)).transpose()
    }

    /// `MGET` (Go's `getStates` in `v2/backends/redis/redis.go` reads a group the same way),
    /// in chunks of 1,000 keys pipelined in one round trip. A key with no value is `None`;
    /// a value that is not a state fails the whole read with [`ErrorKind::Decode`].
    async fn get_states(&self, task_uuids: &[String]) -> Result<Vec<Option<TaskState>>> {
        let raw = self.mget(task_uuids, "read task states").await?;
        if raw.len() != task_uuids.len() {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "Redis at {}: MGET of {} keys returned {} values",
                    self.display,
                    task_uuids.len(),
                    raw.len()
                ),
            ));
        }
        raw.iter()
            .zip(task_uuids)
            .map(|(raw, uuid)| {
                raw.as_deref()
                    .map(|raw| decode_state(uuid, raw))
                    .transpose()
            })
            .collect()
    }

    /// Joins the backend's shared poller (see the [module docs](self#waiting)): the key is
    /// read at once, then on a backoff from 1 ms to 100 ms, batched with every other waited
    /// key. A read that is still in flight at the deadline is abandoned; a read that fails
    /// ends the wait with its error, as a failed `GET` would. Needs a Tokio runtime, where the
    /// poller runs while anyone waits.
    async fn wait_final(&self, task_uuid: &str, deadline: Option<Instant>) -> Result<TaskState> {
        // The poller ends without answering when its runtime shuts down: watching again
        // starts one here. A few times at most, in case this runtime is shutting down too.
        for _ in 0..3 {
            let (answer, _interest) = self.watch(task_uuid)?;
            let answer = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, answer)
                    .await
                    .map_err(|_| timeout(task_uuid))?,
                None => answer.await,
            };
            if let Ok(outcome) = answer {
                return outcome;
            }
        }
        Err(Error::new(
            ErrorKind::Shutdown,
            format!("waiting for task {task_uuid}: the Redis poller's runtime shut down"),
        ))
    }

    async fn purge_state(&self, task_uuid: &str) -> Result<()> {
        self.query::<()>(redis::cmd("DEL").arg(task_uuid), "delete task state")
            .await
    }

    /// `SET group_uuid GroupMeta-JSON EX ResultsExpireIn`, as Go's `InitGroup`.
    async fn init_group(&self, group_uuid: &str, task_uuids: &[String]) -> Result<()> {
        let meta = GroupMeta {
            group_uuid: group_uuid.to_owned(),
            task_uuids: task_uuids.to_vec(),
            created_at: GoTime::now(),
            ..GroupMeta::default()
        };
        let json = crate::wire::to_go_string(&meta)
            .map_err(|e| Error::encode(format!("group {group_uuid}: {e}")))?;
        let mut conn = self.conn.clone();
        let mut set = redis::cmd("SET");
        set.arg(group_uuid)
            .arg(json)
            .arg("EX")
            .arg(self.expiry_secs);
        let write = async {
            let () = set.query_async(&mut conn).await?;
            conn.confirm().await
        };
        self.bounded("store group", write).await
    }

    async fn group_meta(&self, group_uuid: &str) -> Result<Option<GroupMeta>> {
        let raw: Option<Vec<u8>> = self
            .query(redis::cmd("GET").arg(group_uuid), "read group")
            .await?;
        raw.map(|raw| {
            serde_json::from_slice(&raw)
                .map_err(|e| Error::decode(format!("group {group_uuid}: {e}")))
        })
        .transpose()
    }

    /// Flips `"ChordTriggered":false` to `true` in the stored JSON with a Lua script, so exactly
    /// one caller gets `true`. Go workers hold a redsync lock (`TriggerChordMutex`) around the
    /// same read-modify-write; the script does nothing while that lock is held and is retried
    /// for up to 10 s. A group that is no longer stored cannot be triggered (`false`).
    async fn trigger_chord(&self, group_uuid: &str) -> Result<bool> {
        let give_up = Instant::now() + CHORD_LOCK_WAIT;
        loop {
            let mut conn = self.conn.clone();
            let mut invocation = self.trigger_chord_script.key(group_uuid);
            invocation.key(GO_CHORD_LOCK).arg(self.expiry_secs);
            let outcome: i64 = self
                .bounded("trigger chord", invocation.invoke_async(&mut conn))
                .await?;
            match outcome {
                1 => return Ok(true),
                0 => return Ok(false),
                -1 if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                -1 => {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        format!("the chord lock `{GO_CHORD_LOCK}` stayed held"),
                    ))
                }
                -2 => return Ok(false),
                _ => {
                    return Err(Error::decode(format!(
                        "group {group_uuid}: the stored record has no `\"ChordTriggered\":` flag"
                    )))
                }
            }
        }
    }
}

/// A [`TaskState`]'s JSON, cut around its `TaskName` and `CreatedAt` values; the five pieces
/// joined are exactly [`TaskState::to_json`] (a unit test holds the two together). One buffer:
/// each task writes two states, and pieces of their own were a dozen allocations a state.
#[derive(Debug)]
struct Pieces {
    json: Vec<u8>,
    /// Where the `TaskName` value starts and ends, then the `CreatedAt` value.
    cuts: [usize; 4],
}

impl Pieces {
    fn new(state: &TaskState) -> Result<Pieces> {
        use std::io::Write as _;
        fn put<T: serde::Serialize + ?Sized>(
            out: &mut Vec<u8>,
            uuid: &str,
            value: &T,
        ) -> Result<()> {
            crate::wire::to_go_writer(out, value)
                .map_err(|e| Error::encode(format!("state of task {uuid}: {e}")))
        }
        let uuid = &state.task_uuid;
        let mut json =
            Vec::with_capacity(192 + uuid.len() + state.task_name.len() + state.error.len());
        json.extend_from_slice(b"{\"TaskUUID\":");
        put(&mut json, uuid, uuid)?;
        json.extend_from_slice(b",\"TaskName\":");
        let name = json.len();
        put(&mut json, uuid, &state.task_name)?;
        let name_end = json.len();
        json.extend_from_slice(b",\"State\":");
        put(&mut json, uuid, state.state.as_str())?;
        json.extend_from_slice(b",\"Results\":");
        put(&mut json, uuid, &state.results)?;
        json.extend_from_slice(b",\"Error\":");
        put(&mut json, uuid, &state.error)?;
        json.extend_from_slice(b",\"CreatedAt\":");
        let created = json.len();
        put(&mut json, uuid, &state.created_at)?;
        let created_end = json.len();
        write!(json, ",\"TTL\":{}}}", state.ttl)
            .map_err(|e| Error::encode(format!("state of task {uuid}: {e}")))?;
        Ok(Pieces {
            json,
            cuts: [name, name_end, created, created_end],
        })
    }

    /// The JSON before the `TaskName` value, that value, the JSON between it and the
    /// `CreatedAt` value, that value, and the rest.
    fn parts(&self) -> [&[u8]; 5] {
        let [a, b, c, d] = self.cuts;
        [
            &self.json[..a],
            &self.json[a..b],
            &self.json[b..c],
            &self.json[c..d],
            &self.json[d..],
        ]
    }
}

/// The most STARTED records a backend (with its clones) keeps for [`Started`], and the most
/// bytes they take; beyond either, the oldest go first.
const STARTED_MAX: usize = 4096;
const STARTED_MAX_BYTES: usize = 2 << 20;

/// The largest STARTED record kept (one with a long UUID or name takes the guarded path).
const STARTED_MAX_RECORD: usize = 1024;

/// The STARTED records a backend's [`start`](ResultBackend::start) wrote, by task UUID, until
/// the task's [`record`](ResultBackend::record) writes its outcome over one.
///
/// A worker writes STARTED and then its task's outcome. The first reads the stored record to
/// guard the task (a finished or revoked one is not run) and carries its name and creation
/// time forward. For the second, the script would read and match the record again. Instead,
/// `record` sends the STARTED record `start` wrote along with the outcome, its name and
/// creation time already carried, and the script writes the outcome when the store holds
/// exactly that record ([`Encoded::over_started`]). When it does not (a revoke, another
/// state written since), nothing is written and the outcome goes through the guard as before.
/// A record kept here is never trusted alone: it is only compared with the store. Records of
/// tasks that never record an outcome here (a duplicate, a task cancelled, a process stopping)
/// are pushed out, oldest first, by newer ones.
#[derive(Debug, Default)]
struct Started {
    records: Mutex<StartedRecords>,
}

#[derive(Debug, Default)]
struct StartedRecords {
    /// Each record, with the number it was put under.
    by_task: HashMap<Arc<str>, (Vec<u8>, u64)>,
    /// Task UUIDs (shared with `by_task`) with those numbers, oldest first; an entry whose
    /// record was taken or put again since is stale.
    order: std::collections::VecDeque<(Arc<str>, u64)>,
    bytes: usize,
    next: u64,
}

impl Started {
    fn put(&self, uuid: &str, record: Vec<u8>) {
        let size = uuid.len() + record.len();
        let mut records = lock(&self.records);
        let records = &mut *records;
        if let Some((old, _)) = records.by_task.remove(uuid) {
            records.bytes -= uuid.len() + old.len();
        }
        if size > STARTED_MAX_RECORD {
            return;
        }
        let number = records.next;
        records.next += 1;
        let uuid: Arc<str> = Arc::from(uuid);
        records.by_task.insert(Arc::clone(&uuid), (record, number));
        records.order.push_back((uuid, number));
        records.bytes += size;
        while records.by_task.len() > STARTED_MAX || records.bytes > STARTED_MAX_BYTES {
            let Some((oldest, number)) = records.order.pop_front() else {
                break;
            };
            if records
                .by_task
                .get(&*oldest)
                .is_some_and(|(_, n)| *n == number)
            {
                if let Some((old, _)) = records.by_task.remove(&*oldest) {
                    records.bytes -= oldest.len() + old.len();
                }
            }
        }
        // Stale entries are dropped once they are half the queue.
        if records.order.len() > 2 * records.by_task.len() + 64 {
            let by_task = &records.by_task;
            records
                .order
                .retain(|(uuid, number)| by_task.get(&**uuid).is_some_and(|(_, n)| n == number));
        }
    }

    fn take(&self, uuid: &str) -> Option<Vec<u8>> {
        let mut records = lock(&self.records);
        let (record, _) = records.by_task.remove(uuid)?;
        records.bytes -= uuid.len() + record.len();
        Some(record)
    }
}

/// A state ready for [`WRITE_STATES_LUA`]: its key, its flags and the arguments of its form.
#[derive(Debug)]
pub(super) struct Encoded {
    uuid: String,
    /// Form, new state, carry `TaskName`, carry `CreatedAt`, which record to send back.
    flags: [u8; 5],
    form: Form,
}

/// The arguments of a write after its flags.
#[derive(Debug)]
enum Form {
    /// The new JSON in pieces, for the script to guard and join.
    Pieces(Pieces),
    /// The record expected in the store, and the JSON that replaces it when it is there.
    Expected { expected: Vec<u8>, json: Vec<u8> },
}

/// Which stored records a write has sent back (the script's last flag).
#[derive(Debug, Clone, Copy)]
pub(super) enum Back {
    /// Every one.
    All = 0,
    /// A revoke only.
    Revoke = 1,
    /// A final state only, a revoke included.
    Final = 2,
    /// The record written when it wrote, else as [`Final`](Back::Final) (a worker's STARTED,
    /// which its outcome is then written over by comparison; see [`Started`]).
    FinalOrWritten = 3,
}

impl Encoded {
    /// The bytes it sends.
    pub(super) fn len(&self) -> usize {
        self.uuid.len()
            + match &self.form {
                Form::Pieces(pieces) => pieces.json.len(),
                Form::Expected { expected, json } => expected.len() + json.len(),
            }
    }

    /// A write that has every stored record sent back.
    pub(super) fn new(state: &TaskState) -> Result<Encoded> {
        Self::with(state, Back::All)
    }

    /// A write that has only the stored records `back` names sent back.
    pub(super) fn with(state: &TaskState, back: Back) -> Result<Encoded> {
        Ok(Encoded {
            uuid: state.task_uuid.clone(),
            flags: flags(b'P', state, back),
            form: Form::Pieces(Pieces::new(state)?),
        })
    }

    /// A worker's outcome written over `started`, the exact STARTED record its `start` wrote,
    /// if the store still holds it: then the guard allows it (nothing moves a task backwards
    /// from STARTED to RETRY, SUCCESS or FAILURE), and the name and creation time to carry are
    /// those in `started`, which are joined in here as the script would join them, so that
    /// the script need not read the record. `None` for anything but RETRY, SUCCESS and
    /// FAILURE, for a revoke (which has rules of its own), and when `started` is not in the
    /// layout the write script writes.
    fn over_started(state: &TaskState, started: Vec<u8>, back: Back) -> Result<Option<Encoded>> {
        let outcome = matches!(state.state, State::Retry | State::Success | State::Failure);
        if !outcome || is_revoked(state) {
            return Ok(None);
        }
        let Some([name, stored_state, created]) = carried_literals(&started) else {
            return Ok(None);
        };
        // Only over a STARTED or RECEIVED record is an outcome never refused.
        if !matches!(stored_state, b"\"STARTED\"" | b"\"RECEIVED\"") {
            return Ok(None);
        }
        // The script carries a stored string only when it is not empty.
        let name = (state.task_name.is_empty() && name != b"\"\"").then_some(name);
        let created = (state.created_at.is_zero() && created != b"\"\"").then_some(created);
        let mut pieces = Pieces::new(state)?;
        let [name_start, name_end, created_start, created_end] = pieces.cuts;
        // The later piece first, so that the earlier cuts still hold.
        if let Some(created) = created {
            pieces
                .json
                .splice(created_start..created_end, created.iter().copied());
        }
        if let Some(name) = name {
            pieces
                .json
                .splice(name_start..name_end, name.iter().copied());
        }
        Ok(Some(Encoded {
            uuid: state.task_uuid.clone(),
            flags: flags(b'E', state, back),
            form: Form::Expected {
                expected: started,
                json: pieces.json,
            },
        }))
    }
}

/// The script's flags for `state` in `form` (`P` or `E`): the form, the state it writes,
/// whether its name and its creation time are carried, and which record to send back.
fn flags(form: u8, state: &TaskState, back: Back) -> [u8; 5] {
    let flag = |on: bool| if on { b'1' } else { b'0' };
    [
        form,
        state_flag(state),
        flag(state.task_name.is_empty()),
        flag(state.created_at.is_zero()),
        b'0' + back as u8,
    ]
}

/// The script's flag for the state `state` writes.
fn state_flag(state: &TaskState) -> u8 {
    if is_revoked(state) {
        return b'R';
    }
    match state.state {
        State::Pending => b'P',
        State::Received => b'C',
        State::Started => b'S',
        State::Retry => b'T',
        State::Success => b'U',
        State::Failure => b'F',
    }
}

/// The `TaskName`, `State` and `CreatedAt` values of a record the write script wrote, as
/// JSON strings with their quotes. Such a record is in the wire layout, `{"TaskUUID":<string>,
/// "TaskName":<string>,"State":<string>,"Results":...,"CreatedAt":<string>,"TTL":<integer>}`:
/// a JSON string holds no unescaped `"`, so the first `,"TaskName":`, `,"State":` and
/// `,"Results":` and the last `,"CreatedAt":` and `,"TTL":` are the keys'. `None` for
/// anything else.
fn carried_literals(record: &[u8]) -> Option<[&[u8]; 3]> {
    const NAME: &[u8] = b",\"TaskName\":";
    const STATE: &[u8] = b",\"State\":";
    const RESULTS: &[u8] = b",\"Results\":";
    const CREATED: &[u8] = b",\"CreatedAt\":";
    const TTL: &[u8] = b",\"TTL\":";
    if !record.starts_with(b"{\"TaskUUID\":\"") {
        return None;
    }
    let name_start = find(record, NAME)? + NAME.len();
    let name_end = name_start + find(&record[name_start..], STATE)?;
    let state_start = name_end + STATE.len();
    let state_end = state_start + find(&record[state_start..], RESULTS)?;
    let end = rfind(record, TTL)?;
    let created_start = rfind(&record[..end], CREATED)? + CREATED.len();
    if created_start < state_end {
        return None;
    }
    let ttl = record[end + TTL.len()..]
        .strip_suffix(b"}")
        .is_some_and(|n| {
            let n = n.strip_prefix(b"-").unwrap_or(n);
            !n.is_empty() && n.iter().all(u8::is_ascii_digit)
        });
    let literals = [
        &record[name_start..name_end],
        &record[state_start..state_end],
        &record[created_start..end],
    ];
    (ttl && literals.iter().all(|l| is_string(l))).then_some(literals)
}

/// Whether `literal` is one JSON string with no quote inside (escaped or not), which is all
/// a name or creation time the script writes holds.
fn is_string(literal: &[u8]) -> bool {
    literal.len() >= 2
        && literal.starts_with(b"\"")
        && literal.ends_with(b"\"")
        && !literal[1..literal.len() - 1].contains(&b'"')
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where `needle` last occurs in `haystack`.
fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// A client for one Redis server named by `url` (the Redis broker's; it does not go through
/// Sentinel), and the URL as messages show it, without its password.
pub(crate) fn client(url: &str) -> Result<(redis::Client, String)> {
    let parsed = RedisUrl::parse(url)?;
    let display = parsed.display();
    let client = redis::Client::open(parsed.connection_info()?)
        .map_err(|e| backend_error(format!("invalid Redis settings for {display}"), e))?;
    Ok((client, display))
}

/// A Redis URL read as Go Machinery reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisUrl {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) db: i64,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

impl RedisUrl {
    /// Parses a URL. Errors never quote the URL: a malformed one may hold a password anywhere.
    pub(crate) fn parse(url: &str) -> Result<RedisUrl> {
        let invalid = |what: &str| Error::config(format!("invalid Redis URL: {what}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected redis://[password@]host[:port][/db]"))?;
        let tls = if scheme.eq_ignore_ascii_case("redis") {
            false
        } else if scheme.eq_ignore_ascii_case("rediss") {
            true
        } else {
            return Err(invalid("the scheme must be redis:// or rediss://"));
        };
        // The query and fragment carry nothing Go reads.
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                // `user:password` (Redis 6 ACL), `:password`.
                Some((user, pass)) => (
                    Some(percent_decode(user).ok_or_else(|| invalid("bad %-escape in the user"))?)
                        .filter(|u| !u.is_empty()),
                    Some(
                        percent_decode(pass)
                            .ok_or_else(|| invalid("bad %-escape in the password"))?,
                    ),
                ),
                // Go's `password@host`: a lone token is the password.
                None => (
                    None,
                    Some(
                        percent_decode(info)
                            .ok_or_else(|| invalid("bad %-escape in the password"))?,
                    ),
                ),
            },
        };
        let password = password.filter(|p| !p.is_empty());
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| invalid("unclosed `[` in the host"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(invalid("unexpected text after the IPv6 host")),
                },
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = match port {
            None | Some("") => 6379,
            Some(port) => port
                .parse()
                .map_err(|_| invalid("the port is not a number from 0 to 65535"))?,
        };
        // Go reads the first path segment; an empty one is database 0.
        let db = match path.split('/').next().unwrap_or_default() {
            "" => 0,
            db => db
                .parse::<u32>()
                .map_err(|_| invalid("the path must be /<database number>"))?
                .into(),
        };
        Ok(RedisUrl {
            tls,
            host: host.to_owned(),
            port,
            db,
            username,
            password,
        })
    }

    /// `redis://***@host:port/db`: the URL as messages show it.
    pub(crate) fn display(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = if self.password.is_some() || self.username.is_some() {
            "***@"
        } else {
            ""
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{auth}{host}:{}/{}", self.port, self.db)
    }

    pub(crate) fn connection_info(&self) -> Result<redis::ConnectionInfo> {
        let addr = if self.tls {
            if !cfg!(feature = "redis-tls") {
                return Err(Error::config(format!(
                    "{} needs machinery's `redis-tls` feature",
                    self.display()
                )));
            }
            #[cfg(feature = "redis-tls")]
            {
                // rustls needs a process-wide crypto provider; keep one installed elsewhere.
                let _ = rustls::crypto::ring::default_provider().install_default();
            }
            ConnectionAddr::TcpTls {
                host: self.host.clone(),
                port: self.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(self.host.clone(), self.port)
        };
        let mut settings = RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        let info = addr
            .into_connection_info()
            .map_err(|e| backend_error(format!("invalid Redis address {}", self.display()), e))?;
        // TCP_NODELAY, as Go's `net.Dial` sets it on every connection (redis-rs leaves it
        // off): a batch larger than a segment is not held back for an acknowledgement.
        Ok(info
            .set_redis_settings(settings)
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)))
    }
}

/// Decodes `%XX` escapes, as Go's `url.Parse` does in user info; `None` for a bad escape or
/// bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::returned_size;
    use crate::wire::{State, TaskResult};
    use serde_json::json;

    /// Every task's STARTED and SUCCESS go through `write_one`, and `start` and `record` box
    /// its future. A write made at once (one in a burst) keeps its several-kilobyte future in
    /// a box of its own, and one in the next batch waits on its answer alone; before, every
    /// write carried the former (`write_one` was about 7.8 KiB), so that each task made two
    /// such boxes.
    #[test]
    fn a_single_state_write_is_a_small_future() {
        let size = returned_size(
            |(backend, state): (&'static RedisBackend, &'static TaskState)| {
                backend.write_one(state, Back::FinalOrWritten)
            },
        );
        assert!(size <= 512, "write_one: {size} bytes");
    }

    #[test]
    fn the_carried_values_are_read_from_a_record_the_script_wrote() {
        let record = br#"{"TaskUUID":"t1","TaskName":"add","State":"STARTED","Results":null,"Error":"","CreatedAt":"2026-11-29T20:17:52.337696883Z","TTL":0}"#;
        assert_eq!(
            carried_literals(record),
            Some([
                &br#""add""#[..],
                br#""STARTED""#,
                br#""2026-11-29T20:17:52.337696883Z""#
            ])
        );
        // Escapes stay as they are; the keys' text inside a string is always escaped.
        let record = br#"{"TaskUUID":"t\",\"TaskName\":\"x","TaskName":"a\u003cb","State":"RETRY","Results":null,"Error":"x\",\"CreatedAt\":\"y","CreatedAt":"","TTL":-5}"#;
        assert_eq!(
            carried_literals(record),
            Some([&br#""a\u003cb""#[..], br#""RETRY""#, br#""""#])
        );
        for not_ours in [
            &br#"{"TaskName":"add","TaskUUID":"t1","State":"STARTED","Results":null,"CreatedAt":"x","TTL":0}"#[..],
            br#"{"TaskUUID":"t1","TaskName":"add","State":"STARTED","Results":null,"CreatedAt":"x","TTL":0.5}"#,
            br#"{"TaskUUID":"t1","TaskName":"add","State":"STARTED","Results":null,"CreatedAt":"x"}"#,
            br#"{"TaskUUID":"t1","TaskName":add,"State":"STARTED","Results":null,"CreatedAt":"x","TTL":0}"#,
            br#"{"TaskUUID":"t1","TaskName":"a\"b","State":"STARTED","Results":null,"CreatedAt":"x","TTL":0}"#,
            br#"{"TaskUUID":"t1","TaskName":"add","State":null,"Results":null,"CreatedAt":"x","TTL":0}"#,
            br#"{"TaskUUID":"t1","TaskName":"add","State":"STARTED","CreatedAt":"x","TTL":0}"#,
            b"",
        ] {
            assert_eq!(
                carried_literals(not_ours),
                None,
                "{}",
                String::from_utf8_lossy(not_ours)
            );
        }
    }

    #[test]
    fn only_outcomes_are_written_by_comparison() {
        let started = br#"{"TaskUUID":"t1","TaskName":"add","State":"STARTED","Results":null,"Error":"","CreatedAt":"2026-11-29T20:17:52Z","TTL":0}"#;
        for state in [State::Retry, State::Success, State::Failure] {
            let encoded =
                Encoded::over_started(&TaskState::new("t1", state), started.to_vec(), Back::Revoke);
            let Ok(Some(Encoded {
                flags,
                form: Form::Expected { json, .. },
                ..
            })) = encoded
            else {
                panic!("{state}: {encoded:?}");
            };
            assert_eq!(flags[0], b'E');
            let json = String::from_utf8(json).unwrap();
            assert!(
                json.contains(r#""TaskName":"add""#)
                    && json.contains(r#""CreatedAt":"2026-11-29T20:17:52Z""#),
                "{json}"
            );
        }
        for state in [State::Pending, State::Received, State::Started] {
            let encoded =
                Encoded::over_started(&TaskState::new("t1", state), started.to_vec(), Back::Revoke);
            assert!(matches!(encoded, Ok(None)), "{state}");
        }
        let revoke = crate::backend::revoked_state("t1");
        assert!(matches!(
            Encoded::over_started(&revoke, started.to_vec(), Back::Revoke),
            Ok(None)
        ));
        // Over anything but a STARTED or RECEIVED record, the guard decides.
        let success = TaskState::new("t1", State::Success);
        for kept in ["PENDING", "RETRY", "SUCCESS", "FAILURE"] {
            let record = String::from_utf8_lossy(started).replace("STARTED", kept);
            let encoded = Encoded::over_started(&success, record.into_bytes(), Back::Revoke);
            assert!(matches!(encoded, Ok(None)), "{kept}");
        }
        let received = String::from_utf8_lossy(started).replace("STARTED", "RECEIVED");
        let encoded = Encoded::over_started(&success, received.into_bytes(), Back::Revoke);
        assert!(matches!(encoded, Ok(Some(_))));
    }

    #[test]
    fn the_started_records_kept_are_bounded_oldest_first() {
        let started = Started::default();
        for i in 0..STARTED_MAX {
            started.put(&format!("t{i}"), vec![1]);
        }
        // Put again, a record is the newest.
        started.put("t0", vec![2]);
        // One more pushes out the oldest: t1, not t0.
        started.put("another", vec![3]);
        assert_eq!(started.take("t1"), None);
        assert_eq!(started.take("t0"), Some(vec![2]));
        assert_eq!(started.take("t2"), Some(vec![1]));
        assert_eq!(started.take("another"), Some(vec![3]));
        // Bytes are bounded too, and a record too large is not kept.
        started.put("big", vec![0; STARTED_MAX_RECORD]);
        assert_eq!(started.take("big"), None);
        let per = STARTED_MAX_RECORD - 8;
        let last = STARTED_MAX_BYTES / per + 8;
        for i in 0..=last {
            started.put(&format!("b{i:07}"), vec![0; per - 8]);
        }
        let records = lock(&started.records);
        assert!(records.bytes <= STARTED_MAX_BYTES, "{}", records.bytes);
        assert!(records.by_task.contains_key(format!("b{last:07}").as_str()));
        assert!(records.order.len() <= 2 * records.by_task.len() + 64);
    }

    fn parse(url: &str) -> RedisUrl {
        match RedisUrl::parse(url) {
            Ok(u) => u,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    fn url(host: &str, port: u16, db: i64, user: Option<&str>, pass: Option<&str>) -> RedisUrl {
        RedisUrl {
            tls: false,
            host: host.to_owned(),
            port,
            db,
            username: user.map(str::to_owned),
            password: pass.map(str::to_owned),
        }
    }

    #[test]
    fn parses_go_forms() {
        assert_eq!(
            parse("redis://127.0.0.1:6379"),
            url("127.0.0.1", 6379, 0, None, None)
        );
        assert_eq!(
            parse("redis://127.0.0.1:6379/"),
            url("127.0.0.1", 6379, 0, None, None)
        );
        assert_eq!(
            parse("redis://localhost"),
            url("localhost", 6379, 0, None, None)
        );
        assert_eq!(
            parse("redis://secret@redis.example:6380/3"),
            url("redis.example", 6380, 3, None, Some("secret"))
        );
        assert_eq!(
            parse("redis://:secret@host/1"),
            url("host", 6379, 1, None, Some("secret"))
        );
        assert_eq!(
            parse("redis://alice:secret@host:1/2"),
            url("host", 1, 2, Some("alice"), Some("secret"))
        );
        assert_eq!(
            parse("redis://p%40ss%3Aw%2Fd@host"),
            url("host", 6379, 0, None, Some("p@ss:w/d"))
        );
        // The last `@` ends the user info, as in Go's url.Parse.
        assert_eq!(
            parse("redis://a@b@host"),
            url("host", 6379, 0, None, Some("a@b"))
        );
        assert_eq!(
            parse("redis://[::1]:7000/4"),
            url("::1", 7000, 4, None, None)
        );
        assert_eq!(parse("redis://[::1]"), url("::1", 6379, 0, None, None));
        assert_eq!(
            parse("REDIS://host:1/5/extra?x=1#frag"),
            url("host", 1, 5, None, None)
        );
        let tls = parse("rediss://pw@host:6380");
        assert!(tls.tls);
        assert_eq!(tls.password.as_deref(), Some("pw"));
    }

    #[test]
    fn rejects_bad_urls_without_quoting_them() {
        for bad in [
            "amqp://secret@host",
            "secret@host",
            "redis://",
            "redis://secret@",
            "redis://user:secret/x@host",
            "redis://host:secret",
            "redis://host/secret",
            "redis://host/-1",
            "redis://%zzsecret@host",
            "redis://[::1",
        ] {
            match RedisUrl::parse(bad) {
                Ok(u) => panic!("{bad} parsed as {u:?}"),
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
                    assert!(!format!("{e} {e:?}").contains("secret"), "{bad}: {e}");
                }
            }
        }
    }

    #[test]
    fn display_hides_credentials() {
        assert_eq!(
            parse("redis://secret@host:1/2").display(),
            "redis://***@host:1/2"
        );
        assert_eq!(
            parse("rediss://u:secret@[::1]").display(),
            "rediss://***@[::1]:6379/0"
        );
        assert_eq!(parse("redis://host").display(), "redis://host:6379/0");
        assert_eq!(
            crate::config::mask_url("redis://secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
    }

    #[cfg(not(feature = "redis-tls"))]
    #[test]
    fn rediss_needs_the_tls_feature() {
        match parse("rediss://secret@host").connection_info() {
            Ok(_) => panic!("rediss:// accepted without the redis-tls feature"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Config);
                assert!(e.to_string().contains("redis-tls"), "{e}");
                assert!(!e.to_string().contains("secret"), "{e}");
            }
        }
    }

    #[cfg(feature = "redis-tls")]
    #[test]
    fn rediss_connects_with_tls() {
        let info = parse("rediss://secret@host").connection_info().unwrap();
        assert!(matches!(
            info.addr(),
            ConnectionAddr::TcpTls { host, port: 6379, insecure: false, .. } if host == "host"
        ));
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[test]
    fn connection_info_carries_credentials_and_db() {
        let info = match parse("redis://alice:secret@host:1/2").connection_info() {
            Ok(info) => info,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(info.addr(), &ConnectionAddr::Tcp("host".to_owned(), 1));
        let settings = info.redis_settings();
        assert_eq!(settings.db(), 2);
        assert_eq!(settings.username(), Some("alice"));
        assert_eq!(settings.password(), Some("secret"));
        // As Go's net.Dial (and so go-redis) sets it: a command is sent at once, not held for
        // the acknowledgement of the one before.
        assert!(info.tcp_settings().nodelay());
    }

    #[test]
    fn expiry_rounds_up_and_defaults_like_go() {
        assert_eq!(expiry_secs(Duration::ZERO), 3600);
        assert_eq!(expiry_secs(Duration::from_millis(1)), 1);
        assert_eq!(expiry_secs(Duration::from_secs(60)), 60);
        assert_eq!(expiry_secs(Duration::from_millis(60_001)), 61);
    }

    #[test]
    fn pieces_join_to_the_wire_encoding() {
        let created = match chrono::DateTime::parse_from_rfc3339("2026-11-29T20:17:52.337696883Z") {
            Ok(t) => GoTime::from_datetime(t.with_timezone(&chrono::Utc)),
            Err(e) => panic!("{e}"),
        };
        let states = [
            TaskState::new("task_1", State::Pending),
            TaskState {
                task_uuid: "task_\"2\"\n\\/\u{1}é".to_owned(),
                task_name: "add \"x\"".to_owned(),
                state: State::Success,
                results: Some(vec![TaskResult {
                    type_name: "float64".to_owned(),
                    value: json!(8),
                }]),
                error: "<&>".to_owned(),
                created_at: created,
                ttl: 42,
            },
            TaskState {
                results: Some(Vec::new()),
                state: State::Failure,
                error: "boom".to_owned(),
                ..TaskState::new("task_3", State::Failure)
            },
        ];
        for state in states {
            let p = match Pieces::new(&state) {
                Ok(p) => p,
                Err(e) => panic!("{e}"),
            };
            let parts = p.parts();
            let whole = match state.to_json() {
                Ok(s) => s,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(parts.concat(), whole);
            // The script replaces exactly the name's and the creation time's JSON values.
            match (
                crate::wire::to_go_string(&state.task_name),
                crate::wire::to_go_string(&state.created_at),
            ) {
                (Ok(name), Ok(created)) => {
                    assert_eq!(parts[1], name.as_bytes());
                    assert_eq!(parts[3], created.as_bytes());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%FF"), None);
    }
}
