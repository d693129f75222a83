//! The composition root: checks the configuration, builds every part, wires
//! them into the gRPC server (the API, health, reflection) and runs it until
//! a shutdown signal, draining in-flight calls within a bounded grace.

mod error;
mod security;
mod servers;
mod signals;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use aws_config::SdkConfig;
use tokio::{net::TcpListener, time::Instant};
use tokio_util::task::AbortOnDropHandle;
use tonic::{server::NamedService, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing_appender::non_blocking::ErrorCounter;

pub use self::{error::StartupError, security::Loaded, signals::shutdown_signal};
use self::{
    security::{load_policy, load_tls, log_security_posture, policy_reload, tls_reload},
    servers::{spawn_health_server, spawn_metrics_server},
};
use crate::{
    authz::{CurrentPolicy, Policy},
    cognito::Cognito,
    config::Config,
    connections::{self, ConnectionLimits, CountOpenCallsLayer},
    incoming,
    limiter::{
        Budget, BudgetSettings, CallerSettings, LocalBudget, SharedBudget, SharedSettings,
        budget_script, mode_gauge,
    },
    metrics::Metrics,
    pools::PoolPolicy,
    proto::{self, session_service_server::SessionServiceServer},
    redis::{Redis, RedisSettings},
    reload::{self, Watched},
    request_guard::RequestGuardLayer,
    revocation::{self, RevocationMetrics, Revocations},
    service::{CallerPolicy, SessionApi, UserLogging},
    signout::{Revoker, SignOutFlow},
    telemetry::{RpcTelemetryLayer, UserHasher},
    tls::{CurrentTlsConfig, TlsFiles},
    tokens::{TokenMetrics, Tokens, http::HttpJwksSource},
    users::{LookupMetrics, ResolverSettings, SubResolver},
};

/// HTTP/2 streams a client may open and reset before the server accepts
/// them (hyper's default, stated so that it stays deliberate).
const MAX_PENDING_RESET_STREAMS: usize = 20;

/// Largest request the API decodes. A GlobalSignOutRequest is under 200 bytes
/// and a VerifyTokenRequest holds at most an 8 KiB token (refused as
/// INVALID_ARGUMENT beyond that) and its client ids; anything bigger is
/// hostile, and refusing it before decoding costs nothing.
const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Health turns SERVING at the latest this long after start, loaded
/// revocation log or not.
const READY_WITHOUT_REVOCATIONS_AFTER: Duration = Duration::from_secs(10);

/// What [`check`] derives from valid configuration.
pub struct Checked {
    /// Default and allowed pools.
    pub pools: PoolPolicy,
    /// The keyed hash for usernames in logs.
    pub hasher: UserHasher,
    /// TLS files, their contents and the configuration built from them.
    pub tls: Option<Loaded<TlsFiles, Arc<rustls::ServerConfig>>>,
    /// The policy file, its contents and the policy.
    pub policy: Option<Loaded<PathBuf, Policy>>,
    /// Connections the gRPC port may hold at once.
    pub max_connections: u64,
    /// Where the fleet's budget lives, if it is shared.
    pub redis: Option<RedisSettings>,
}

/// Checks what can be checked without serving: flags that are only wrong
/// together, the region, the user-hash key file, TLS files and the policy.
pub fn check(config: &Config, sdk_config: &SdkConfig) -> Result<Checked, StartupError> {
    let pools = config.pool_policy()?;
    if sdk_config.region().is_none() {
        return Err(StartupError::NoRegion);
    }
    let security = &config.security;
    let tls = security.tls_files().map(load_tls).transpose()?;
    let policy = security.authz_policy.clone().map(load_policy).transpose()?;
    let verifies_callers = security.tls_client_ca.is_some() || security.trust_forwarded_client_cert;
    let max_connections = connection_budget(config)?;
    if policy.is_some() && !verifies_callers {
        return Err(StartupError::PolicyWithoutIdentity);
    }
    let redis = config.redis.settings()?;
    if let Some(settings) = &redis {
        crate::redis::check(settings)?;
    }
    Ok(Checked {
        pools,
        hasher: user_hasher(config)?,
        tls,
        policy,
        max_connections,
        redis,
    })
}

/// The gRPC port's connection budget, after raising the open-files limit:
/// what is left once the metrics and health ports' budgets and the Cognito
/// client's connections (one per call in flight) are set aside.
fn connection_budget(config: &Config) -> Result<u64, StartupError> {
    let limit = connections::raise_fd_limit();
    let side_listeners = if config.security.health_listen.is_some() {
        2
    } else {
        1
    };
    // Redis: the shared connection and the revocation log's reader, and
    // a second of each while they reconnect.
    let redis = if config.redis.redis_url.is_some() {
        4
    } else {
        0
    };
    let others =
        config.connections.metrics_max_connections * side_listeners + config.max_in_flight + redis;
    Ok(connections::grpc_budget(
        limit,
        config.connections.max_connections,
        others,
    )?)
}

/// The Cognito budget: this process's own, or with Redis the fleet's, with
/// a local fallback at the fallback rate.
fn budget(config: &Config, redis: Option<Redis>, metrics: &Metrics) -> Budget {
    let fleet = config.budget();
    let Some(redis) = redis else {
        let mode = mode_gauge(metrics.registry());
        mode.with_label_values(&["local"]).set(1);
        mode.with_label_values(&["shared"]).set(0);
        return Budget::Local(LocalBudget::start(fleet, config.callers()));
    };
    let fallback_rate = config.redis.fallback_rate(fleet.rate_per_sec);
    let fallback = LocalBudget::start(
        BudgetSettings {
            rate_per_sec: fallback_rate,
            burst: config.redis.fallback_rate_limit_burst,
            ..fleet
        },
        config.callers(),
    );
    tracing::info!(
        fleet_rate_per_sec = fleet.rate_per_sec,
        fleet_burst = fleet.burst,
        fallback_rate_per_sec = fallback_rate,
        "rate budget: the fleet's, in Redis; local until connected"
    );
    let settings = SharedSettings {
        rate_per_sec: fleet.rate_per_sec,
        burst: fleet.burst,
        max_queue: fleet.max_queue,
        max_wait: fleet.max_wait,
        cooldown: config.redis.redis_cooldown,
        key_prefix: config.redis.redis_key_prefix.clone(),
    };
    Budget::Shared(SharedBudget::new(
        redis,
        settings,
        fallback,
        metrics.registry(),
    ))
}

/// The revocation watermarks: in Redis beside the budget, or in this
/// process only, which the operator is warned of.
fn revocations(config: &Config, redis: Option<Redis>, metrics: &Metrics) -> Revocations {
    let settings = config.revocation.settings();
    let metrics = RevocationMetrics::new(metrics.registry());
    match redis {
        Some(redis) => Revocations::with_redis(
            settings,
            redis,
            &config.redis.redis_key_prefix,
            config.redis.redis_cooldown,
            metrics,
        ),
        None => {
            tracing::warn!(
                "revocation watermarks are kept in this process only (no --redis-url): they are \
                 lost at restart and other replicas never see them, so a token revoked here stays \
                 active in VerifyToken elsewhere"
            );
            Revocations::in_memory(settings, metrics)
        }
    }
}

fn user_hasher(config: &Config) -> Result<UserHasher, StartupError> {
    if let Some(path) = &config.log_user_hash_key_file {
        return UserHasher::from_key_file(path).map_err(|source| StartupError::HashKeyFile {
            path: path.display().to_string(),
            source,
        });
    }
    Ok(match &config.log_user_hash_key {
        Some(key) => UserHasher::with_key(key.as_bytes()),
        None => {
            tracing::warn!(
                "no --log-user-hash-key: user hashes in logs match only within this process"
            );
            UserHasher::random()
        }
    })
}

/// A bound, ready-to-run server. Bind to port 0 and read [`Self::local_addr`]
/// to run one per test.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    health_listener: Option<(TcpListener, SocketAddr)>,
    tls: Option<Arc<CurrentTlsConfig>>,
    reloads: Vec<(Watched, Vec<Vec<u8>>)>,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
    metrics: Arc<Metrics>,
    flow: SignOutFlow,
    api: SessionApi,
    revocations: Revocations,
    lifecycle: Lifecycle,
    log_drops: Option<ErrorCounter>,
}

/// Connection and shutdown timings, from the flags.
#[derive(Debug, Clone, Copy)]
struct Lifecycle {
    drain_delay: Duration,
    shutdown_grace: Duration,
    max_connection_age: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    handshake_timeout: Duration,
    max_concurrent_streams: u32,
    max_header_list_size: u32,
    reload_interval: Duration,
    max_connections: u64,
    side_max_connections: u64,
    first_bytes_timeout: Duration,
    max_connection_age_grace: Duration,
    request_body_timeout: Duration,
    max_frames_per_second: u32,
    max_frames_per_second_total: u32,
    idle_timeout: Duration,
}

impl Lifecycle {
    /// The bounds of a listener holding `max` connections; the hard end and
    /// the frame budget apply to every listener serving HTTP/2.
    fn limits(&self, max: u64) -> ConnectionLimits {
        let mut limits =
            ConnectionLimits::new(max, self.first_bytes_timeout, self.handshake_timeout);
        limits.hard_end_after = Some(self.max_connection_age + self.max_connection_age_grace);
        limits.frames_per_sec = Some(self.max_frames_per_second);
        limits.frames_total = Some(self.max_frames_per_second_total);
        limits.idle_timeout = Some(self.idle_timeout);
        limits
    }
}

impl Application {
    /// Validates the configuration, builds the Cognito client and binds the
    /// listener. Nothing is served until [`Self::run_until_stopped`].
    pub async fn build(config: &Config, sdk_config: &SdkConfig) -> Result<Self, StartupError> {
        let checked = check(config, sdk_config)?;
        log_security_posture(&config.security, &checked);
        let Checked {
            pools,
            hasher,
            tls,
            policy,
            max_connections,
            redis,
        } = checked;
        tracing::info!(max_connections, "connection budget of the gRPC port");
        let mut reloads = Vec::new();
        let tls = tls.map(|loaded| {
            let current = Arc::new(CurrentTlsConfig::new(loaded.value));
            reloads.push((tls_reload(loaded.source, current.clone()), loaded.contents));
            current
        });
        let authz = policy.map(|loaded| {
            let current = Arc::new(CurrentPolicy::from_pointee(loaded.value));
            reloads.push((
                policy_reload(loaded.source, current.clone()),
                loaded.contents,
            ));
            current
        });
        let cognito = Cognito::new(sdk_config, &config.upstream());
        let metrics = Arc::new(Metrics::new());
        metrics.configured_rate.set(config.rate_limit_rps);
        // One client for the budget and the revocation log.
        let redis = redis
            .map(|settings| {
                let scripts = [vec![budget_script()], revocation::scripts()].concat();
                Redis::connect(&settings, metrics.registry(), scripts)
            })
            .transpose()?;
        let revocations = revocations(config, redis.clone(), &metrics);
        let tokens = tokens(config, &metrics, revocations.clone())?;
        let users = sub_resolver(config, &cognito, &metrics)?;
        let max_in_flight = usize::try_from(config.max_in_flight).unwrap_or(usize::MAX);
        let flow = SignOutFlow::new(
            Arc::new(cognito),
            Some(Revoker {
                users,
                revocations: revocations.clone(),
            }),
            budget(config, redis, &metrics),
            max_in_flight,
            config.retry(),
            metrics.clone(),
        );
        let (listener, local_addr) = bind(config.listen).await?;
        let (metrics_listener, metrics_addr) = bind(config.metrics_listen).await?;
        let health_listener = match config.security.health_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let security = &config.security;
        Ok(Self {
            listener,
            local_addr,
            health_listener,
            tls,
            reloads,
            metrics_listener,
            metrics_addr,
            metrics: metrics.clone(),
            flow: flow.clone(),
            api: SessionApi::new(
                flow,
                pools,
                CallerPolicy {
                    caller_id_header: config.caller_id_header.clone(),
                    trust_forwarded_client_cert: security.trust_forwarded_client_cert,
                    authz,
                },
                config.upstream_timeout,
                UserLogging {
                    hasher,
                    log_usernames: config.log_usernames,
                },
                metrics,
                tokens,
                revocations.clone(),
            ),
            revocations,
            lifecycle: Lifecycle {
                drain_delay: config.drain_delay,
                shutdown_grace: config.shutdown_grace,
                max_connection_age: config.max_connection_age,
                keepalive_interval: config.http2_keepalive_interval,
                keepalive_timeout: config.http2_keepalive_timeout,
                handshake_timeout: security.tls_handshake_timeout,
                max_concurrent_streams: security.max_concurrent_streams,
                max_header_list_size: security.max_header_list_size,
                reload_interval: security.reload_interval,
                max_connections,
                side_max_connections: config.connections.metrics_max_connections,
                first_bytes_timeout: config.connections.first_bytes_timeout,
                max_connection_age_grace: config.connections.max_connection_age_grace,
                request_body_timeout: config.connections.request_body_timeout,
                max_frames_per_second: config.connections.max_frames_per_second,
                max_frames_per_second_total: config.connections.max_frames_per_second_total,
                idle_timeout: config.connections.idle_timeout,
            },
            log_drops: None,
        })
    }

    /// Exports the log writer's count of dropped lines with the metrics.
    pub fn count_log_drops(&mut self, counter: ErrorCounter) {
        self.log_drops = Some(counter);
    }

    /// The address actually bound (the real port when `--listen` said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The plaintext health listener's address, when `--health-listen` is set.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// The metrics listener's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Serves until `shutdown` resolves, then: health NOT_SERVING at once,
    /// keep serving for the drain delay, stop accepting (GOAWAY), let
    /// in-flight calls finish for at most the shutdown grace.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let api = SessionServiceServer::new(self.api).max_decoding_message_size(MAX_REQUEST_BYTES);
        let reflection_v1 = reflection().build_v1()?;
        // grpcurl up to 1.8.x only speaks v1alpha.
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let lifecycle = self.lifecycle;
        // Ready once the revocation log is loaded, so that VerifyToken here
        // knows every watermark. A log still arriving is waited for however
        // long it takes (a partial map would pass revoked tokens); only a
        // failing Redis makes it ready without, so that an outage at start
        // does not keep a whole rollout unready.
        let ready = {
            let health = health.clone();
            let revocations = self.revocations.clone();
            let mut caught_up = revocations.caught_up();
            AbortOnDropHandle::new(tokio::spawn(async move {
                loop {
                    let waited = tokio::time::timeout(
                        READY_WITHOUT_REVOCATIONS_AFTER,
                        caught_up.wait_for(|loaded| *loaded),
                    )
                    .await;
                    match waited {
                        // Loaded; or the follower is gone (never here).
                        Ok(_) => break,
                        Err(_) if revocations.loading() => {
                            tracing::info!(
                                watermarks = revocations.len(),
                                "revocation log still loading: not ready yet"
                            );
                        }
                        Err(_) => {
                            tracing::warn!(
                                after = ?READY_WITHOUT_REVOCATIONS_AFTER,
                                "ready without the revocation log loaded: VerifyToken here misses \
                                 watermarks recorded by other replicas until Redis answers"
                            );
                            break;
                        }
                    }
                }
                set_health(&health, ServingStatus::Serving).await;
            }))
        };
        // Set when the drain delay is over: the end of the shutdown grace.
        let (grace_end_tx, grace_end) = tokio::sync::watch::channel(None);
        let stop_accepting = {
            let health = health.clone();
            let revocations = self.revocations.clone();
            async move {
                shutdown.await;
                // Never SERVING again once draining: the task may be inside
                // its own set_health, so it is awaited, not just aborted.
                ready.abort();
                let _ = ready.await;
                set_health(&health, ServingStatus::NotServing).await;
                tracing::info!(drain_delay = ?lifecycle.drain_delay, "shutdown requested: health NOT_SERVING, still serving");
                // Endpoint removal takes a while to reach every load balancer
                // and client; calls that arrive meanwhile are still served.
                tokio::time::sleep(lifecycle.drain_delay).await;
                tracing::info!("drain delay over: refusing new calls, finishing in-flight ones");
                // Watch streams never finish by themselves: their clients
                // resume elsewhere with their cursors.
                revocations.close_watchers();
                let _ = grace_end_tx.send(Some(Instant::now() + lifecycle.shutdown_grace));
            }
        };

        let metrics_stop = spawn_metrics_server(
            self.metrics_listener,
            self.metrics.clone(),
            self.flow.clone(),
            self.log_drops,
            lifecycle.side_max_connections,
        );
        let health_stop = self.health_listener.map(|(listener, _)| {
            let limits = lifecycle.limits(lifecycle.side_max_connections);
            spawn_health_server(listener, health_service.clone(), limits)
        });
        let reloaders: Vec<_> = self
            .reloads
            .into_iter()
            .map(|(watched, initial)| {
                let metrics = self.metrics.clone();
                let interval = lifecycle.reload_interval;
                AbortOnDropHandle::new(tokio::spawn(async move {
                    reload::watch(watched, initial, interval, &metrics).await;
                }))
            })
            .collect();
        let incoming = incoming::accept(
            self.listener,
            self.tls,
            lifecycle.limits(lifecycle.max_connections),
        );

        tracing::info!(addr = %self.local_addr, metrics_addr = %self.metrics_addr, "serving session.v1.SessionService");
        let server = Server::builder()
            // GOAWAY at this age makes clients reconnect, so connections
            // pinned to old pods behind a ClusterIP rebalance. No age *grace*
            // here (with tonic 0.14.9 it suppresses the GOAWAY altogether):
            // the connection's I/O ends at age + grace (`connections`).
            .max_connection_age(lifecycle.max_connection_age)
            // PINGs find dead peers that TCP alone would not notice for hours.
            .http2_keepalive_interval(Some(lifecycle.keepalive_interval))
            .http2_keepalive_timeout(Some(lifecycle.keepalive_timeout))
            // Bounds on what one connection may cost: streams at once, header
            // bytes per call, and (HTTP/2 rapid reset) streams a client may
            // open and cancel before the server has accepted them.
            .max_concurrent_streams(lifecycle.max_concurrent_streams)
            .http2_max_header_list_size(lifecycle.max_header_list_size)
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
            // Outermost: what is not a gRPC request is refused (415) before
            // it costs anything or reaches a handler, and a request body that
            // never ends stops holding the call after its timeout.
            .layer(RequestGuardLayer::new(lifecycle.request_body_timeout))
            // The RPC span (joined to the caller's trace), duration metric and
            // access line. tonic's own grpc-timeout layer sits outside every
            // layer added here and drops the call when it fires, so the
            // record is also written when the call is dropped.
            .layer(RpcTelemetryLayer::new(self.metrics.clone()))
            // Innermost: a call is open (its connection not idle) from here
            // until its response body is done; refused requests never count,
            // so they cannot keep a connection from being idle.
            .layer(CountOpenCallsLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(api)
            .serve_with_incoming_shutdown(incoming, stop_accepting);

        // tonic waits for every connection to close, with no limit: an idle
        // keep-alive client or a Health/Watch stream would hold us forever.
        let grace_expired = {
            let mut grace_end = grace_end.clone();
            async move {
                match grace_end.wait_for(Option::is_some).await.map(|end| *end) {
                    Ok(Some(end)) => tokio::time::sleep_until(end).await,
                    _ => std::future::pending::<()>().await,
                }
            }
        };
        let mut result = Ok(());
        tokio::select! {
            served = server => {
                match served {
                    Ok(()) => tracing::info!("drained; exiting"),
                    Err(error) => {
                        tracing::error!(%error, "server stopped with an error");
                        result = Err(StartupError::Serve(error));
                    }
                }
            }
            () = grace_expired => {
                tracing::warn!(grace = ?lifecycle.shutdown_grace, "shutdown grace ran out; closing remaining connections");
            }
        }
        // Sign-outs whose callers left may still be calling Cognito: they
        // get what is left of the grace to finish and audit their calls.
        let grace_end = grace_end.borrow().unwrap_or_else(Instant::now);
        self.flow.shutdown(grace_end).await;
        // Then their watermarks, and those held through an outage, go to
        // Redis for the other replicas, within the same grace.
        self.revocations.flush(grace_end).await;
        let _ = metrics_stop.send(());
        if let Some(stop) = health_stop {
            let _ = stop.send(());
        }
        drop(reloaders);
        result
    }
}

/// The token verifier: JWKS from `--cognito-endpoint` (moto) or the
/// region's Cognito endpoint; the issuer is always the AWS form.
fn tokens(
    config: &Config,
    metrics: &Metrics,
    revocations: Revocations,
) -> Result<Tokens, StartupError> {
    let settings = config.tokens.settings();
    let source = HttpJwksSource::new(config.cognito_endpoint.as_deref(), settings.fetch_timeout)?;
    let token_metrics = TokenMetrics::register(metrics.registry())?;
    Ok(Tokens::new(
        Arc::new(source),
        &settings,
        revocations,
        token_metrics,
    ))
}

/// The username → sub resolver, with a budget of this replica's own: the
/// UserRead quota is apart from the sign-outs', and lookups are few.
fn sub_resolver(
    config: &Config,
    cognito: &Cognito,
    metrics: &Metrics,
) -> Result<SubResolver, StartupError> {
    let budget = LocalBudget::start(config.user_lookup_budget(), CallerSettings::default());
    Ok(SubResolver::new(
        Arc::new(cognito.clone()),
        Budget::Local(budget),
        ResolverSettings {
            cache_size: config.users.cache_size(),
            cache_ttl: config.users.user_cache_ttl,
            attempt_timeout: config.upstream_attempt_timeout,
        },
        LookupMetrics::register(metrics.registry())?,
    ))
}

/// Binds `addr`, returning the listener and the address actually bound.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartupError> {
    let bind_error = |source| StartupError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// The same status for the whole server (`""`) and for the API itself.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <SessionServiceServer<SessionApi> as NamedService>::NAME,
            status,
        )
        .await;
}

/// Reflection over our API, health and the google.rpc error details, so that
/// grpcurl can describe the service and decode error details with no protos.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}
