//! The web dashboard: `machinery dashboard --listen 127.0.0.1:8080`.
//!
//! A small server-rendered page set on [`Admin`], served with axum:
//!
//! - **Overview** (`/`): every machinery queue with its depth, in/out rate, consumers and
//!   dead letters; the live workers; a throughput chart (tasks/s and failures/s over the last
//!   15 minutes). Tables and chart refresh by themselves every 5 s.
//! - **Tasks** (`/tasks`): the recent-task index by state, 50 a page, newest first; search by
//!   UUID; a detail page per task (`/tasks/<uuid>`) with its state, results, error, timeline
//!   and the chain, group or chord it belongs to, each member a link.
//! - **Dead letters** (`/dead-letters`): each message with its reason, with buttons to
//!   requeue one or all and to purge.
//!
//! Pages are HTML built in Rust with every stored value escaped, plus one small script and
//! stylesheet compiled into the binary and served by the dashboard; no Node build step, no
//! request leaves for a CDN.
//!
//! # Security
//!
//! - It binds to loopback by default, and without a token it answers only requests whose
//!   `Host` is a loopback name (no DNS rebinding).
//! - A non-loopback address needs a token ([`Dashboard::token`], `DASHBOARD_TOKEN` for the
//!   CLI); [`Dashboard::spawn`] refuses to start without one. The token is accepted as
//!   `Authorization: Bearer`, as the cookie the login form sets, or once as `?token=`.
//! - Every state-changing request is a POST carrying the page's CSRF token; others get 403.
//!
//! ```no_run
//! use machinery::admin::Admin;
//! use machinery::dashboard::Dashboard;
//!
//! # async fn demo() -> machinery::Result<()> {
//! let admin = Admin::from_config(&machinery::Config::from_env()?).await?;
//! let dashboard = Dashboard::new(admin)
//!     .listen("127.0.0.1:8080".parse().unwrap())
//!     .spawn()
//!     .await?;
//! println!("dashboard on http://{}", dashboard.local_addr());
//! tokio::signal::ctrl_c().await.ok();
//! dashboard.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod assets;
mod auth;
mod html;
mod pages;
mod rates;

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::error::{Error, ErrorKind, Result};

use self::auth::Security;
use self::rates::Samples;

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The state every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) admin: Admin,
    pub(crate) security: Arc<Security>,
    pub(crate) samples: Arc<Mutex<Samples>>,
}

/// A dashboard to start; see the [module docs](self).
///
/// ```
/// use machinery::dashboard::Dashboard;
/// # fn demo(admin: machinery::admin::Admin) {
/// let dashboard = Dashboard::new(admin)
///     .listen("0.0.0.0:8080".parse().unwrap())
///     .token(Some("a long random secret".to_owned()));
/// # drop(dashboard);
/// # }
/// ```
pub struct Dashboard {
    admin: Admin,
    listen: SocketAddr,
    token: Option<String>,
    sample_every: Duration,
}

impl fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dashboard")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("sample_every", &self.sample_every)
            .finish_non_exhaustive()
    }
}

impl Dashboard {
    /// A dashboard on `admin`, to listen on [`DEFAULT_LISTEN`] without a token.
    ///
    /// ```
    /// # fn demo(admin: machinery::admin::Admin) {
    /// let dashboard = machinery::dashboard::Dashboard::new(admin);
    /// # drop(dashboard);
    /// # }
    /// ```
    pub fn new(admin: Admin) -> Dashboard {
        Dashboard {
            admin,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            sample_every: Duration::from_secs(5),
        }
    }

    /// The address to listen on (port 0: any free port, see
    /// [`DashboardHandle::local_addr`]).
    ///
    /// ```
    /// # fn demo(admin: machinery::admin::Admin) {
    /// let dashboard = machinery::dashboard::Dashboard::new(admin)
    ///     .listen("127.0.0.1:0".parse().unwrap());
    /// # drop(dashboard);
    /// # }
    /// ```
    pub fn listen(mut self, addr: SocketAddr) -> Dashboard {
        self.listen = addr;
        self
    }

    /// The access token; required to listen on a non-loopback address. `None` or an empty
    /// token means none.
    ///
    /// ```
    /// # fn demo(admin: machinery::admin::Admin) {
    /// let token = std::env::var("DASHBOARD_TOKEN").ok();
    /// let dashboard = machinery::dashboard::Dashboard::new(admin).token(token);
    /// # drop(dashboard);
    /// # }
    /// ```
    pub fn token(mut self, token: Option<String>) -> Dashboard {
        self.token = token.filter(|token| !token.is_empty());
        self
    }

    /// How often queue depths and worker counters are sampled for the in/out rates (default
    /// 5 s, at least 100 ms).
    ///
    /// ```
    /// # fn demo(admin: machinery::admin::Admin) {
    /// let dashboard = machinery::dashboard::Dashboard::new(admin)
    ///     .sample_every(std::time::Duration::from_secs(2));
    /// # drop(dashboard);
    /// # }
    /// ```
    pub fn sample_every(mut self, every: Duration) -> Dashboard {
        self.sample_every = every.max(Duration::from_millis(100));
        self
    }

    /// Checks the settings, binds the address and serves in the background.
    ///
    /// Fails with [`ErrorKind::Config`] for a non-loopback address without a token, a token
    /// that is not printable ASCII or shorter than 16 characters, or an address that cannot
    /// be bound.
    ///
    /// ```no_run
    /// # async fn demo(admin: machinery::admin::Admin) -> machinery::Result<()> {
    /// let handle = machinery::dashboard::Dashboard::new(admin).spawn().await?;
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn spawn(self) -> Result<DashboardHandle> {
        let Dashboard {
            admin,
            listen,
            token,
            sample_every,
        } = self;
        check_settings(listen, token.as_deref())?;
        let listener = TcpListener::bind(listen).await.map_err(|error| {
            Error::new(
                ErrorKind::Config,
                format!("the dashboard cannot listen on {listen}: {error}"),
            )
        })?;
        let local_addr = listener.local_addr().map_err(|error| {
            Error::new(
                ErrorKind::Config,
                format!("the dashboard's address: {error}"),
            )
        })?;
        let state = AppState {
            admin,
            security: Arc::new(Security::new(token)),
            samples: Arc::new(Mutex::new(Samples::default())),
        };
        let sampler = tokio::spawn(pages::sample_forever(state.clone(), sample_every));
        let app = router(state);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(error = %error, "the dashboard stopped");
            }
        });
        tracing::info!(addr = %local_addr, "dashboard listening");
        Ok(DashboardHandle {
            local_addr,
            stop,
            server,
            sampler,
        })
    }
}

/// A non-loopback address needs a token, and a token must be worth its name.
fn check_settings(listen: SocketAddr, token: Option<&str>) -> Result<()> {
    if let Some(token) = token {
        if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::new(
                ErrorKind::Config,
                "DASHBOARD_TOKEN must be at least 16 printable ASCII characters without spaces",
            ));
        }
    } else if !auth::is_loopback(listen.ip()) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "the dashboard listens on {listen}, which is not a loopback address: set DASHBOARD_TOKEN"
            ),
        ));
    }
    Ok(())
}

/// All routes: the login form and the two static assets outside the access check, everything
/// else inside it; the CSRF check in front of every POST; the security headers on every
/// response.
fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/", get(pages::overview))
        .route("/partials/queues", get(pages::queues_partial))
        .route("/partials/workers", get(pages::workers_partial))
        .route("/api/throughput", get(pages::throughput_json))
        .route("/tasks", get(pages::tasks))
        .route("/tasks/search", get(pages::search))
        .route("/tasks/{uuid}", get(pages::task))
        .route("/tasks/{uuid}/revoke", post(pages::revoke))
        .route("/dead-letters", get(pages::dead_letters))
        .route("/dead-letters/requeue", post(pages::requeue))
        .route("/dead-letters/purge", post(pages::purge_dead_letters))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_access,
        ));
    Router::new()
        .route("/login", get(pages::login_form).post(pages::login))
        .route(assets::CSS_PATH, get(assets::css))
        .route(assets::JS_PATH, get(assets::js))
        .merge(protected)
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_csrf,
        ))
        .layer(axum::middleware::from_fn(auth::security_headers))
        .with_state(state)
}

/// A running dashboard; see [`Dashboard::spawn`].
#[derive(Debug)]
pub struct DashboardHandle {
    local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
    sampler: JoinHandle<()>,
}

impl DashboardHandle {
    /// The address it listens on.
    ///
    /// ```no_run
    /// # async fn demo(admin: machinery::admin::Admin) -> machinery::Result<()> {
    /// let handle = machinery::dashboard::Dashboard::new(admin)
    ///     .listen("127.0.0.1:0".parse().unwrap())
    ///     .spawn()
    ///     .await?;
    /// println!("http://{}/", handle.local_addr());
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections, lets requests in progress finish, and stops sampling.
    ///
    /// ```no_run
    /// # async fn demo(handle: machinery::dashboard::DashboardHandle) {
    /// handle.shutdown().await;
    /// # }
    /// ```
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        self.sampler.abort();
        let _ = self.server.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_a_token() {
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let lo6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert!(check_settings(lo, None).is_ok());
        assert!(check_settings(lo6, None).is_ok());
        let refused = check_settings(any, None).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Config);
        assert!(refused.to_string().contains("DASHBOARD_TOKEN"), "{refused}");
        assert!(check_settings(any, Some("0123456789abcdef")).is_ok());
        assert!(check_settings(any, Some("short")).is_err());
        assert!(check_settings(any, Some("with a space in it!")).is_err());
    }
}
