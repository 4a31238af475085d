//! Sending a task by name with Go-typed arguments, for tasks this process does not define
//! (Go: `server.SendTask(&tasks.Signature{Name: "add", Args: []tasks.Arg{...}})`).

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};
use crate::result::AsyncResult;
use crate::server::Server;
use crate::value::check_arg;
use crate::wire::{self, Arg, TaskResult, TaskState};

/// Arguments for [`Server::send_by_name`]: a `Vec<Arg>` (or an array of them), or a
/// `serde_json::Value` array in Go's wire form, `[{"Type":"float64","Value":1}, ...]`.
///
/// ```
/// use machinery::wire::Arg;
/// use machinery::IntoArgs;
/// use serde_json::json;
///
/// let args = json!([{"Type": "float64", "Value": 1}, {"Type": "string", "Value": "x"}]);
/// let args: Vec<Arg> = args.into_args()?;
/// assert_eq!(args[1].type_name, "string");
/// assert!(json!({"Type": "float64"}).into_args().is_err()); // not an array
/// # Ok::<(), machinery::Error>(())
/// ```
pub trait IntoArgs {
    /// The arguments, or an error of kind [`ErrorKind::Encode`] when they are not in Go's
    /// form.
    fn into_args(self) -> Result<Vec<Arg>>;
}

impl IntoArgs for Vec<Arg> {
    fn into_args(self) -> Result<Vec<Arg>> {
        Ok(self)
    }
}

impl<const N: usize> IntoArgs for [Arg; N] {
    fn into_args(self) -> Result<Vec<Arg>> {
        Ok(self.into())
    }
}

impl IntoArgs for Value {
    fn into_args(self) -> Result<Vec<Arg>> {
        let Value::Array(items) = self else {
            return Err(Error::encode(
                "arguments must be a JSON array of {\"Type\": ..., \"Value\": ...} objects",
            ));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                if !item.is_object() {
                    return Err(Error::encode(format!(
                        "argument {i} must be a {{\"Type\": ..., \"Value\": ...}} object"
                    )));
                }
                serde_json::from_value(item)
                    .map_err(|e| Error::encode(format!("argument {i}: {e}")))
            })
            .collect()
    }
}

impl Server {
    /// Sends the task registered as `name` on some worker, Go or Rust, with Go-typed
    /// arguments, as Go's `server.SendTask` sends a `tasks.Signature` built by hand. Each
    /// argument's `Type` must be one of Go's ([`value::GO_TYPES`](crate::value::GO_TYPES))
    /// and its `Value` of that type; otherwise nothing is sent and the error, of kind
    /// [`ErrorKind::Encode`], says which argument is wrong.
    ///
    /// The handle's [`get`](AsyncResult::get) gives the results as Go-typed values;
    /// [`typed`](AsyncResult::typed) and [`json`](AsyncResult::json) read them as a Rust type
    /// or as plain JSON. For routing keys, ETAs or retries, send a [`wire::Signature`] with
    /// [`send_wire`](Server::send_wire) and follow it with
    /// [`AsyncResult::from_uuid`].
    ///
    /// ```
    /// use machinery::{task, Config, Server};
    /// use serde_json::json;
    ///
    /// #[task]
    /// fn add(a: f64, b: f64) -> f64 { a + b }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let server = Server::new(Config::builder().broker("memory://by-name-docs").build()?).await?;
    /// let worker = server.worker().spawn().await?;
    /// let args = json!([{"Type": "float64", "Value": 1}, {"Type": "float64", "Value": 2}]);
    /// let handle = server.send_by_name("add", args).await?;
    /// assert_eq!(handle.typed::<f64>().get().await?, 3.0);
    /// assert_eq!(handle.json().get().await?, json!(3.0));
    /// assert_eq!(handle.get().await?[0].type_name, "float64");
    /// worker.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_by_name(
        &self,
        name: &str,
        args: impl IntoArgs,
    ) -> Result<AsyncResult<Vec<TaskResult>>> {
        if name.is_empty() {
            return Err(Error::encode("the task name is empty"));
        }
        let args = args.into_args()?;
        for (i, arg) in args.iter().enumerate() {
            check_arg(arg).map_err(|e| {
                Error::encode(format!("task `{name}`, argument {i}: {}", e.message()))
            })?;
        }
        let signature = wire::Signature {
            uuid: wire::new_uuid("task_"),
            name: name.to_owned(),
            args,
            ..wire::Signature::default()
        };
        let uuid = signature.uuid.clone();
        self.publish(signature).await?;
        tracing::debug!(task.name = name, task.id = %uuid, "sent a task by name");
        Ok(AsyncResult::from_uuid(self, uuid))
    }

    /// The stored state of any task, sent by this process or not (Go:
    /// `backend.GetState(taskUUID)`); `None` when the backend has none (never sent, or
    /// expired). An error when no result backend is configured or the backend fails.
    ///
    /// ```
    /// use machinery::wire::State;
    /// use machinery::{task, Config, Server};
    ///
    /// #[task]
    /// fn hello() -> String { "hi".into() }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let server = Server::new(Config::builder().broker("memory://state-docs").build()?).await?;
    /// let uuid = server.send(hello::signature()).await?.task_uuid().to_owned();
    /// let state = server.state(&uuid).await?.expect("recorded as PENDING when sent");
    /// assert_eq!(state.state, State::Pending); // no worker runs yet
    /// assert!(server.state("task_unknown").await?.is_none());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn state(&self, task_uuid: &str) -> Result<Option<TaskState>> {
        let backend = self.backend().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "no result backend is configured (set RESULT_BACKEND)",
            )
        })?;
        backend.get_state(task_uuid).await
    }
}
