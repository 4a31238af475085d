//! Waiting for a sent task's result.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::time::Instant;

use crate::backend::ResultBackend;
use crate::error::{Error, ErrorKind, Result};
use crate::signature::Decoder;
use crate::wire::{State, TaskResult, TaskState};

/// A handle on a sent task (or chain), returned by [`Server::send`](crate::Server::send).
///
/// [`get`](Self::get) waits for the final result, typed as the (last) task's output. For a
/// chain it waits for each link in turn, so a link that fails ends the wait with its error
/// instead of waiting forever for links that will never run.
pub struct AsyncResult<O> {
    backend: Option<Arc<dyn ResultBackend>>,
    /// Tasks that must succeed first (a chord's members).
    prerequisites: Vec<String>,
    links: Vec<String>,
    decode: Decoder<O>,
}

impl<O> AsyncResult<O> {
    pub(crate) fn new(
        backend: Option<Arc<dyn ResultBackend>>,
        links: Vec<String>,
        decode: Decoder<O>,
    ) -> Self {
        AsyncResult {
            backend,
            prerequisites: Vec::new(),
            links,
            decode,
        }
    }

    pub(crate) fn after(mut self, prerequisites: Vec<String>) -> Self {
        self.prerequisites = prerequisites;
        self
    }

    /// The UUID of the (first) task.
    pub fn task_uuid(&self) -> &str {
        self.links.first().map(String::as_str).unwrap_or_default()
    }

    /// The UUIDs of every link of a chain, in order.
    pub fn task_uuids(&self) -> &[String] {
        &self.links
    }

    /// The current state of the (last) task, if the backend has one.
    pub async fn state(&self) -> Result<Option<TaskState>> {
        let backend = self.backend()?;
        match self.links.last() {
            Some(uuid) => backend.get_state(uuid).await,
            None => Ok(None),
        }
    }

    /// Waits for the result. A task that failed returns an error of kind
    /// [`ErrorKind::Task`] carrying its message.
    pub async fn get(&self) -> Result<O> {
        self.wait(None).await
    }

    /// Waits for the result at most `timeout`; past it, returns an error of kind
    /// [`ErrorKind::Timeout`].
    pub async fn get_timeout(&self, timeout: Duration) -> Result<O> {
        self.wait(Some(Instant::now() + timeout)).await
    }

    async fn wait(&self, deadline: Option<Instant>) -> Result<O> {
        let backend = self.backend()?;
        // A chord's members all at once (a backend that polls reads them together), taken in
        // order: the first failure in the group's order ends the wait.
        let mut members: FuturesOrdered<_> = self
            .prerequisites
            .iter()
            .map(|uuid| backend.wait_final(uuid, deadline))
            .collect();
        while let Some(state) = members.next().await {
            let state = state?;
            if state.state == State::Failure {
                return Err(Error::task(state.error));
            }
        }
        let mut last = None;
        for uuid in &self.links {
            let state = backend.wait_final(uuid, deadline).await?;
            if state.state == State::Failure {
                return Err(Error::task(state.error));
            }
            last = Some(state);
        }
        let results = last.and_then(|s| s.results).unwrap_or_default();
        (self.decode)(&results)
    }

    fn backend(&self) -> Result<&Arc<dyn ResultBackend>> {
        self.backend.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "no result backend is configured (set RESULT_BACKEND)",
            )
        })
    }
}

// ---- Dynamic results: tasks sent by name, and tasks followed by UUID ----

impl AsyncResult<Vec<TaskResult>> {
    /// Follows a task this process did not send, by its UUID (Go:
    /// `result.NewAsyncResult(&tasks.Signature{UUID: uuid}, backend)`), through `server`'s
    /// result backend. [`get`](Self::get) gives the results as Go-typed values;
    /// [`typed`](Self::typed) and [`json`](Self::json) read them as a Rust type or as JSON.
    ///
    /// ```
    /// use machinery::{task, AsyncResult, Config, Server};
    ///
    /// #[task]
    /// fn add(a: f64, b: f64) -> f64 { a + b }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let config = Config::builder().broker("memory://from-uuid-docs").build()?;
    /// let server = Server::new(config.clone()).await?;
    /// let worker = server.worker().spawn().await?;
    /// let uuid = server.send(add::signature(1.0, 2.0)).await?.task_uuid().to_owned();
    ///
    /// // Elsewhere, with only the UUID:
    /// let other = Server::new(config).await?;
    /// let sum: f64 = AsyncResult::from_uuid(&other, uuid).typed().get().await?;
    /// assert_eq!(sum, 3.0);
    /// worker.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_uuid(server: &crate::Server, task_uuid: impl Into<String>) -> Self {
        AsyncResult::new(
            server.backend().cloned(),
            vec![task_uuid.into()],
            decode_dynamic,
        )
    }
}

impl<O> AsyncResult<O> {
    /// The same task, its result read as `T`: one result of `T`'s Go type (see
    /// [`value`](crate::value)). A task with no or several results, or another type, gives an
    /// error of kind [`ErrorKind::Decode`].
    ///
    /// ```
    /// use machinery::{task, Config, Server};
    ///
    /// #[task]
    /// fn count(s: String) -> i64 { s.len() as i64 }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let server = Server::new(Config::builder().broker("memory://typed-docs").build()?).await?;
    /// let worker = server.worker().spawn().await?;
    /// let handle = server.send(count::signature("four".into())).await?;
    /// assert_eq!(handle.typed::<i64>().get().await?, 4);
    /// assert!(handle.typed::<String>().get().await.is_err()); // an int64, not a string
    /// worker.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn typed<T: serde::de::DeserializeOwned + 'static>(&self) -> AsyncResult<T> {
        self.with_decoder(crate::private::decode_one::<T>)
    }

    /// The same task, its results as Go sent them: each with its Go type name.
    ///
    /// ```
    /// use machinery::{task, Config, Server};
    ///
    /// #[task]
    /// fn pair() -> (String, i64) { ("a".into(), 1) }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let server = Server::new(Config::builder().broker("memory://dynamic-docs").build()?).await?;
    /// let worker = server.worker().spawn().await?;
    /// let results = server.send(pair::signature()).await?.dynamic().get().await?;
    /// let types: Vec<&str> = results.iter().map(|r| r.type_name.as_str()).collect();
    /// assert_eq!(types, ["string", "int64"]);
    /// worker.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn dynamic(&self) -> AsyncResult<Vec<TaskResult>> {
        self.with_decoder(decode_dynamic)
    }

    /// The same task, its results as plain JSON: one result is its value, several are an
    /// array of their values, none is `null`.
    ///
    /// ```
    /// use machinery::{task, Config, Server};
    /// use serde_json::json;
    ///
    /// #[task]
    /// fn pair() -> (String, i64) { ("a".into(), 1) }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let server = Server::new(Config::builder().broker("memory://json-docs").build()?).await?;
    /// let worker = server.worker().spawn().await?;
    /// assert_eq!(server.send(pair::signature()).await?.json().get().await?, json!(["a", 1]));
    /// worker.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn json(&self) -> AsyncResult<serde_json::Value> {
        self.with_decoder(decode_json)
    }

    fn with_decoder<T>(&self, decode: Decoder<T>) -> AsyncResult<T> {
        AsyncResult {
            backend: self.backend.clone(),
            prerequisites: self.prerequisites.clone(),
            links: self.links.clone(),
            decode,
        }
    }
}

fn decode_dynamic(results: &[TaskResult]) -> Result<Vec<TaskResult>> {
    Ok(results.to_vec())
}

fn decode_json(results: &[TaskResult]) -> Result<serde_json::Value> {
    Ok(match results {
        [] => serde_json::Value::Null,
        [one] => plain(one),
        several => several.iter().map(plain).collect(),
    })
}

/// A result's value as plain JSON. A Go float is written without a fraction when it is whole
/// (`2`, as Go's encoder writes it): it is read back as a float (`2.0`), as its type says.
fn plain(result: &TaskResult) -> serde_json::Value {
    match (result.type_name.as_str(), &result.value) {
        ("float64" | "float32", serde_json::Value::Number(n)) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| result.value.clone(), serde_json::Value::Number),
        _ => result.value.clone(),
    }
}

impl<O> fmt::Debug for AsyncResult<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

/// A handle on a sent group, returned by [`Server::send_group`](crate::Server::send_group).
pub struct GroupResult<O> {
    group_uuid: String,
    members: Vec<AsyncResult<O>>,
}

impl<O> GroupResult<O> {
    pub(crate) fn new(group_uuid: String, members: Vec<AsyncResult<O>>) -> Self {
        GroupResult {
            group_uuid,
            members,
        }
    }

    /// The group's UUID.
    pub fn group_uuid(&self) -> &str {
        &self.group_uuid
    }

    /// The members' handles, in the group's order.
    pub fn members(&self) -> &[AsyncResult<O>] {
        &self.members
    }

    /// Waits for every member; their results in the group's order, or the first failure in
    /// that order. The members are waited for together (a backend that polls reads them in
    /// batches).
    pub async fn get(&self) -> Result<Vec<O>> {
        self.wait(None).await
    }

    /// Like [`get`](Self::get), waiting at most `timeout` in all.
    pub async fn get_timeout(&self, timeout: Duration) -> Result<Vec<O>> {
        self.wait(Some(Instant::now() + timeout)).await
    }

    async fn wait(&self, deadline: Option<Instant>) -> Result<Vec<O>> {
        let mut members: FuturesOrdered<_> = self
            .members
            .iter()
            .map(|member| member.wait(deadline))
            .collect();
        let mut out = Vec::with_capacity(self.members.len());
        while let Some(result) = members.next().await {
            out.push(result?);
        }
        Ok(out)
    }
}

impl<O> fmt::Debug for GroupResult<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupResult")
            .field("group_uuid", &self.group_uuid)
            .field("members", &self.members.len())
            .finish()
    }
}
