use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mesh_agent::capture::{self, Capture};
use mesh_agent::controller::ControllerClient;
use mesh_agent::controller::last_good::LastGood;
use mesh_agent::identity::store::CertStore;
use mesh_agent::identity::{LocalCa, SecretManager};
use mesh_agent::state::AgentState;
use mesh_agent::{admin, cni_server, handover, inpod, node};
use mesh_common::cni::DEFAULT_AGENT_SOCKET;
use mesh_common::config::NodeConfig;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// jemalloc instead of glibc's malloc: glibc kept every page that thousands of closed connections had used (RSS
/// never came back down); jemalloc's background thread returns pages a second after they were freed.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc at start-up (the crate prefixes its symbols with `_rjem_`).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "nodemesh node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach capture, serve enrolled pods, the CNI socket, admin API and metrics.
    Run(Box<RunArgs>),
    /// Remove every pin (which detaches all programs) and undo the routing set up in enrolled pods.
    Cleanup(PathArgs),
    /// Manage a local certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Install or remove the nodemesh-cni chained plugin on this node.
    #[command(subcommand)]
    Cni(CniCommand),
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy nodemesh-cni into the CNI bin dir and chain it into the node's primary network config (the
    /// DaemonSet's init container does this on every start).
    Install {
        #[command(flatten)]
        dirs: CniDirs,
        /// Agent socket the plugin should use, when not the default.
        #[arg(long)]
        agent_socket: Option<String>,
        /// Namespaces whose pods start without the agent and are never captured (repeat, or comma-separated;
        /// an empty value excludes none). Default: kube-system and nodemesh-system.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        exclude_namespaces: Option<Vec<String>>,
        /// How long to wait for the node's network plugin to write its config.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Remove nodemesh-cni from every network config and the CNI bin dir (after uninstalling nodemesh).
    Uninstall {
        #[command(flatten)]
        dirs: CniDirs,
    },
}

#[derive(Args)]
struct CniDirs {
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new root CA (ca.key, ca.crt) in DIR, for `run --ca-dir DIR`.
    Init {
        dir: PathBuf,
        #[arg(long, default_value = mesh_common::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

#[derive(Args)]
struct PathArgs {
    /// Directory on a bpf filesystem where programs' links and maps are pinned.
    #[arg(long, env = "NODEMESH_BPFFS", default_value = "/sys/fs/bpf/nodemesh")]
    bpffs: PathBuf,
    /// Where the agent keeps the list of enrolled pods across restarts.
    #[arg(long, env = "NODEMESH_STATE_DIR", default_value = "/run/nodemesh")]
    state_dir: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Name of this node.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// cgroup v2 directory the capture programs attach to; default: the cgroup v2 mount (all of the node).
    #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    #[command(flatten)]
    paths: PathArgs,
    /// NodeConfig YAML file (the offline/debug config source).
    #[arg(long, env = "NODEMESH_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "NODEMESH_ADMIN", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    #[arg(long, env = "NODEMESH_METRICS", default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    /// `istio`: also serve the traffic metrics under Istio's standard names at `/stats/prometheus` (for Kiali
    /// and the Istio dashboards); `/metrics` keeps the native names either way.
    #[arg(long, env = "NODEMESH_METRICS_COMPAT", value_enum, default_value = "none")]
    metrics_compat: MetricsCompat,
    /// How long the metric series of a workload that left the node are kept (so the last scrape sees its
    /// final counts).
    #[arg(long, env = "NODEMESH_METRICS_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    metrics_grace: std::time::Duration,
    /// Unix socket the nodemesh-cni plugin connects to.
    #[arg(long, env = "NODEMESH_CNI_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
    cni_socket: PathBuf,
    /// The controller's gRPC address (e.g. `https://nodemesh-controller.nodemesh-system.svc:15012`): the normal
    /// mode. Config and certificates then come from it; `--config` only seeds the config until it answers.
    #[arg(long, env = "NODEMESH_CONTROLLER", conflicts_with = "ca_dir")]
    controller: Option<String>,
    /// PEM root certificate(s) the controller's TLS certificate must chain to (the mesh CA's root).
    #[arg(long, env = "NODEMESH_CONTROLLER_CA", requires = "controller")]
    controller_ca: Option<PathBuf>,
    /// File with the token for the controller: the bootstrap token, or in Kubernetes the agent's projected
    /// service-account token (re-read for every call, as the kubelet rotates it).
    #[arg(long, env = "NODEMESH_TOKEN_FILE", requires = "controller")]
    token_file: Option<PathBuf>,
    /// Directory of a local CA (ca.key, ca.crt, optional root.crt) that signs workload certificates (offline
    /// mode). Without it or a controller there are no identities and all traffic stays plaintext L4.
    #[arg(long, env = "NODEMESH_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Lifetime of workload certificates; they are renewed at half of it.
    #[arg(long, env = "NODEMESH_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_lifetime: std::time::Duration,
    /// The TLS library of HBONE: aws-lc-rs (post-quantum key exchange X25519MLKEM768 offered first) or ring
    /// (classical key exchange only).
    #[arg(long, env = "NODEMESH_TLS_PROVIDER", value_enum, default_value = "aws-lc-rs")]
    tls_provider: mesh_agent::identity::crypto::Provider,
    /// Only post-quantum key exchange on HBONE (X25519MLKEM768): peers that cannot do it are refused, as with
    /// ztunnel's COMPLIANCE_POLICY=pqc.
    #[arg(long, env = "NODEMESH_REQUIRE_PQC")]
    require_pqc: bool,
    /// Proxy worker threads; default: one per CPU. Fewer threads mean fewer cross-thread hand-offs per request,
    /// more mean more parallel connections.
    #[arg(long, env = "NODEMESH_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// The agent's own DaemonSet (`namespace/name`). When set, stopping checks with the API server whether it is
    /// gone or being deleted (nodemesh being uninstalled) and only then removes the CNI plugin (see
    /// `--cni-conf-dir`) and the pinned programs; a restart or an upgrade keeps both.
    #[arg(long, env = "NODEMESH_DAEMONSET", requires_all = ["cni_conf_dir", "cni_bin_dir"])]
    daemonset: Option<String>,
    /// The API server for `--daemonset` (default: the in-cluster address from KUBERNETES_SERVICE_HOST).
    #[arg(long, env = "NODEMESH_KUBE_API")]
    kube_api: Option<String>,
    /// The token for `--kube-api` (default: the pod's service-account token). Not `--token-file`: that one is
    /// minted for the controller's audience, which the API server refuses.
    #[arg(long, env = "NODEMESH_KUBE_TOKEN_FILE")]
    kube_token_file: Option<PathBuf>,
    /// The node's CNI config dir, as mounted into the agent: nodemesh-cni is kept chained there while the agent
    /// runs (`cni_watch`) and removed on uninstall.
    #[arg(long, env = "NODEMESH_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// The node's CNI bin dir, as mounted into the agent (for removal on uninstall).
    #[arg(long, env = "NODEMESH_CNI_BIN_DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// A request head (HTTP/1) must arrive whole within this — the first after the connection opens and each
    /// later one after the previous response, so it is also the keep-alive idle timeout.
    #[arg(long, env = "NODEMESH_HTTP_HEADER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    http_header_timeout: std::time::Duration,
    /// Connections one pod may have open through the agent at once; beyond it new ones are reset.
    #[arg(long, env = "NODEMESH_MAX_CONNECTIONS_PER_POD", default_value_t = mesh_agent::limits::DEFAULT_MAX_CONNECTIONS_PER_POD)]
    max_connections_per_pod: usize,
    /// An HBONE connection to another agent without streams for this long is closed.
    #[arg(long, env = "NODEMESH_HBONE_IDLE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    hbone_idle_timeout: std::time::Duration,
    /// Let calling agents send their requests straight on HBONE connections, each request a stream of its own.
    /// `false` answers them as earlier agents did, so their requests travel as HTTP/2 inside a tunnel (for
    /// mixed-version tests; it costs a second HTTP/2 layer on both agents).
    #[arg(long, env = "NODEMESH_HBONE_L7_DIRECT", default_value_t = true, action = clap::ArgAction::Set)]
    hbone_l7_direct: bool,
    /// How long `/quitquitquit` waits for proxied connections to finish before exiting.
    #[arg(long, env = "NODEMESH_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    drain_timeout: std::time::Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MetricsCompat {
    None,
    Istio,
}

fn main() -> anyhow::Result<()> {
    mesh_agent::identity::crypto::install_process_default();
    mesh_agent::logging::init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.on_thread_park(mesh_agent::allocator::flush_thread_cache_if_due);
            if let Some(n) = args.worker_threads.filter(|n| *n > 0) {
                runtime.worker_threads(n);
            }
            runtime.enable_all().build()?.block_on(run(*args))
        }
        Command::Cleanup(args) => cleanup(&args),
        Command::Cni(CniCommand::Install { dirs, agent_socket, exclude_namespaces, wait }) => {
            let binary = std::env::current_exe()?.with_file_name(mesh_agent::cni_install::PLUGIN);
            let deadline = std::time::Instant::now() + wait;
            let excluded: Option<Vec<String>> =
                exclude_namespaces.map(|list| list.into_iter().filter(|n| !n.is_empty()).collect());
            let entry = mesh_agent::cni_install::PluginEntry {
                agent_socket: agent_socket.as_deref(),
                exclude_namespaces: excluded.as_deref(),
            };
            loop {
                match mesh_agent::cni_install::install(&binary, &dirs.bin_dir, &dirs.conf_dir, &entry) {
                    Ok(path) => {
                        println!("nodemesh-cni chained into {}", path.display());
                        return Ok(());
                    }
                    // The node's network plugin may not have written its config yet.
                    Err(e @ mesh_agent::cni_install::InstallError::NoConfig(_))
                        if std::time::Instant::now() < deadline =>
                    {
                        eprintln!("{e}; waiting");
                        std::thread::sleep(std::time::Duration::from_secs(2));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Command::Cni(CniCommand::Uninstall { dirs }) => {
            for path in mesh_agent::cni_install::uninstall(&dirs.bin_dir, &dirs.conf_dir)? {
                println!("nodemesh-cni removed from {}", path.display());
            }
            Ok(())
        }
        Command::Ca(CaCommand::Init { dir, trust_domain }) => {
            LocalCa::init(&dir, &trust_domain)?;
            println!("created a root CA in {}", dir.display());
            Ok(())
        }
    }
}

fn load_config(path: Option<&Path>) -> anyhow::Result<NodeConfig> {
    let Some(path) = path else { return Ok(NodeConfig::from_yaml("")?) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    NodeConfig::from_yaml(&text).with_context(|| format!("config {}", path.display()))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    node::raise_fd_limit();
    let config = load_config(args.config.as_deref())?;
    let cgroup_root = match args.cgroup_root.clone() {
        Some(dir) => dir,
        None => node::cgroup2_mount().context("finding the cgroup v2 mount (or pass --cgroup-root)")?,
    };
    let capture = Capture::load(&args.paths.bpffs, &cgroup_root).context("setting up eBPF capture")?;
    tracing::info!(node = %args.node, cgroup = %cgroup_root.display(), bpffs = %args.paths.bpffs.display(), "capture attached");

    mesh_agent::state_dir::create_private_dir(&args.paths.state_dir)
        .with_context(|| format!("creating state dir {}", args.paths.state_dir.display()))?;
    let mut kept_config = None;
    let controller = match &args.controller {
        Some(url) => {
            let token_file = args.token_file.as_ref().context("--controller needs --token-file")?;
            let mut client = ControllerClient::new(url, args.controller_ca.as_deref(), token_file, args.node.clone())?;
            kept_config = client.resume_from(LastGood::new(&args.paths.state_dir));
            Some(client)
        }
        None => None,
    };
    let tls = mesh_agent::identity::crypto::TlsPolicy { provider: args.tls_provider, require_pqc: args.require_pqc };
    let provider = tls.crypto_provider()?;
    let secrets = match (&controller, &args.ca_dir) {
        (Some(client), _) => {
            let store = CertStore::open(&args.paths.state_dir.join("certs"))
                .with_context(|| format!("certificate store under {}", args.paths.state_dir.display()))?;
            Some(SecretManager::with_store(
                std::sync::Arc::new(client.clone()),
                args.cert_lifetime,
                Some(store),
                provider,
            )?)
        }
        (None, Some(dir)) => {
            let ca = LocalCa::load(dir).context("loading the CA (create one with `mesh-agent ca init DIR`)")?;
            Some(SecretManager::with_store(std::sync::Arc::new(ca), args.cert_lifetime, None, provider)?)
        }
        (None, None) => {
            tracing::warn!("no --controller or --ca-dir: no workload identities, meshed traffic stays plaintext");
            None
        }
    };
    let state_file = args.paths.state_dir.join("pods.json");
    let istio_names = args.metrics_compat == MetricsCompat::Istio;
    // Fed by the controller, the agent resumes from the last config it applied, if one was kept; a `--config`
    // seed comes next; with neither it refuses enrolled pods' traffic until the controller answers.
    let resuming = kept_config.is_some();
    let seeded = args.config.is_some();
    let config = kept_config.unwrap_or(config);
    if resuming {
        tracing::info!(version = %config.version, "resuming from the last good config until the controller answers");
    }
    let limits = mesh_agent::limits::Limits {
        header_timeout: args.http_header_timeout,
        max_connections_per_pod: args.max_connections_per_pod,
        hbone_idle_timeout: args.hbone_idle_timeout,
    };
    let state = AgentState::new(args.node.clone(), capture, config.clone(), state_file, secrets, istio_names, limits);
    state.data_plane().set_direct_l7(args.hbone_l7_direct);
    state.set_config(config).context("applying capture exclusions")?;
    if let Some(client) = controller {
        match (resuming, seeded) {
            (true, _) => {}
            (false, true) => state.expect_config(),
            (false, false) => {
                tracing::warn!("no config yet: enrolled pods' connections are refused until the controller answers");
                state.fail_closed_until_config();
            }
        }
        tokio::spawn(client.run_config_stream(state.clone()));
    }
    state.capture().set_node_addresses(&node::local_addresses()?).context("recording node addresses")?;

    // An agent still running on this node (an upgrade) hands its sockets over instead of this one opening them.
    let (mut inherited, adoption) = take_over(&args.paths.state_dir, &state).await?;
    let admin = host_listener(inherited.admin(args.admin), args.admin).context("admin address")?;
    let metrics = host_listener(inherited.metrics(args.metrics), args.metrics).context("metrics address")?;
    let admin_socket = admin::socket_path(&args.paths.state_dir);
    let read_only = admin::Access::ReadOnly { socket: admin_socket.clone() };
    let admin_task = tokio::spawn(admin::serve_http(
        TcpListener::from_std(admin.try_clone()?)?,
        admin::admin_routes(state.clone(), read_only),
    ));
    // Bound anew by each agent (an upgraded one takes the path over; the old one's listener is then unreachable).
    let full_admin = admin::bind_socket(&admin_socket)
        .with_context(|| format!("binding the admin socket {}", admin_socket.display()))?;
    tokio::spawn(admin::serve_unix(full_admin, admin::admin_routes(state.clone(), admin::Access::Full)));
    let metrics_task = tokio::spawn(admin::serve_http(
        TcpListener::from_std(metrics.try_clone()?)?,
        admin::metrics_routes(state.clone()),
    ));
    tokio::spawn(mesh_agent::scrape::prune_departed(state.clone(), args.metrics_grace));
    tokio::spawn(state.pool().clone().close_idle_connections());

    inpod::readopt(&state, &mut |container| inherited.pod(container)).await.map_err(|e| {
        anyhow::anyhow!(
            "{}: {} (stop the other agent, or let it hand over: docs/install.md, Upgrades)",
            e.msg,
            e.details
        )
    })?;
    let cni = match inherited.cni() {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            listener
        }
        None => cni_server::bind(&args.cni_socket)
            .with_context(|| format!("CNI socket {}", args.cni_socket.display()))?
            .into_std()?,
    };
    let cni_task =
        tokio::spawn(cni_server::serve(tokio::net::UnixListener::from_std(cni.try_clone()?)?, state.clone()));
    state.set_capture_ready();
    let cni_watch = mesh_agent::cni_watch::Stop::default();
    if let (Some(bin), Some(conf)) = (&args.cni_bin_dir, &args.cni_conf_dir) {
        let socket = args.cni_socket.to_str().filter(|s| *s != DEFAULT_AGENT_SOCKET);
        let entry = mesh_agent::cni_install::PluginEntry { agent_socket: socket, ..Default::default() }.to_json();
        let (bin, conf, stop) = (bin.clone(), conf.clone(), cni_watch.clone());
        tokio::spawn(mesh_agent::cni_watch::keep_chained(bin, conf, entry, stop));
    }
    // Every config applied so far (some arrived during re-adoption) and each later one, as it comes.
    tokio::spawn(inpod::reconcile_on_config_change(state.clone()));
    if let Some(adoption) = adoption {
        wait_until_ready(&state, std::time::Duration::from_secs(30)).await;
        adoption.complete().context("telling the previous agent it can go")?;
        tracing::info!("took over from the previous agent");
    }
    let host = handover::HostListeners {
        admin: (admin, admin_task.abort_handle()),
        metrics: (metrics, metrics_task.abort_handle()),
        cni: (cni, cni_task.abort_handle()),
    };
    handover::serve(&args.paths.state_dir, state.clone(), host).context("handover socket")?;
    tracing::info!(admin = %args.admin, metrics = %args.metrics, cni = %args.cni_socket.display(), "agent ready");

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => match load_config(args.config.as_deref()).and_then(|c| {
                if let Some(secrets) = state.secrets() {
                    secrets.reload_trust_bundle()?;
                }
                Ok(c)
            }) {
                Ok(config) => match state.set_config(config) {
                    Ok(()) => tracing::info!("config reloaded"),
                    Err(e) => tracing::error!(error = %e, "cannot apply reloaded config; keeping the previous one"),
                },
                Err(e) => tracing::error!(error = format!("{e:#}"), "config reload failed; keeping the previous one"),
            },
            // Kubernetes stops pods with SIGTERM: drain like /quitquitquit, within the grace period.
            _ = terminate.recv() => {
                state.request_quit();
                drain(&state, args.drain_timeout).await;
                if uninstalling(&args).await {
                    // Not chained back behind the uninstall's back.
                    cni_watch.stop_and(|| remove_from_node(&args));
                    return Ok(());
                }
                break;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = state.quit_requested() => {
                drain(&state, args.drain_timeout).await;
                break;
            }
        }
    }
    // Pins stay: enrolled pods remain captured (fail-closed) and the next agent re-adopts them.
    tracing::info!("agent stopping; capture stays pinned for the next agent (`mesh-agent cleanup` removes it)");
    Ok(())
}

/// Whether the agent's DaemonSet is gone or being deleted (only with `--daemonset`; any doubt is a no).
async fn uninstalling(args: &RunArgs) -> bool {
    let Some((namespace, name)) = args.daemonset.as_deref().and_then(|d| d.split_once('/')) else { return false };
    let located = mesh_agent::uninstall::OwnDaemonSet::locate(
        args.kube_api.as_deref(),
        namespace,
        name,
        args.kube_token_file.as_deref(),
    );
    let Some(ds) = located else {
        tracing::warn!(
            "--daemonset without API access (no KUBERNETES_SERVICE_HOST or --kube-api); keeping the CNI plugin"
        );
        return false;
    };
    match mesh_agent::uninstall::check(&ds).await {
        Ok(verdict) => {
            tracing::info!(?verdict, daemonset = %format!("{namespace}/{name}"), "checked the agent's DaemonSet");
            verdict == mesh_agent::uninstall::Verdict::Uninstalling
        }
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "cannot tell an uninstall from a restart; keeping the CNI plugin");
            false
        }
    }
}

/// nodemesh is being uninstalled: take the CNI plugin and the capture off this node.
fn remove_from_node(args: &RunArgs) {
    if let (Some(bin), Some(conf)) = (&args.cni_bin_dir, &args.cni_conf_dir) {
        match mesh_agent::cni_install::uninstall(bin, conf) {
            Ok(changed) => tracing::info!(configs = ?changed, "nodemesh-cni removed"),
            Err(e) => tracing::error!(error = %e, "cannot remove nodemesh-cni"),
        }
    }
    if let Err(e) = cleanup(&args.paths) {
        tracing::error!(error = format!("{e:#}"), "cannot remove the capture");
    }
}

/// Takes the listeners of the agent running on the node, if there is one, once this one has a config to serve
/// them with. A predecessor that said hello and then failed the exchange is an error: it may still hold the
/// sockets, and opening new ones beside it would fail or, worse, release its pods.
async fn take_over(
    state_dir: &Path,
    state: &AgentState,
) -> anyhow::Result<(handover::inherited::Inherited, Option<handover::Adoption>)> {
    let Some(predecessor) = handover::Predecessor::find(state_dir).context("contacting the running agent")? else {
        return Ok((handover::inherited::Inherited::default(), None));
    };
    tracing::info!("an agent is running on this node; taking over its sockets once the config is here");
    while !state.data_plane().has_config() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (inherited, adoption) = predecessor.take().await.context("taking over from the running agent")?;
    tracing::info!(pods = inherited.pod_count(), "received the running agent's listeners");
    Ok((inherited, Some(adoption)))
}

/// A host listener: the one handed over, or a new one.
fn host_listener(inherited: Option<std::net::TcpListener>, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = match inherited {
        Some(l) => l,
        None => std::net::TcpListener::bind(addr).with_context(|| format!("{addr}"))?,
    };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Waits until the agent is ready (config, capture, certificates), for at most `timeout`.
async fn wait_until_ready(state: &AgentState, timeout: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !state.ready() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if !state.ready() {
        tracing::warn!(?timeout, "not ready yet; taking over anyway (the previous agent has handed everything over)");
    }
}

/// Stops accepting, tells keep-alive clients to move (`drain`) and lets proxied connections finish, for at most
/// `timeout` (not ready meanwhile, so no new traffic is steered here by orchestration).
async fn drain(state: &AgentState, timeout: std::time::Duration) {
    state.start_draining();
    inpod::stop_accepting(state);
    tracing::info!(active = state.active_connections(), ?timeout, "draining");
    let deadline = tokio::time::Instant::now() + timeout;
    while state.active_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tracing::info!(left = state.active_connections(), "drained");
}

fn cleanup(args: &PathArgs) -> anyhow::Result<()> {
    let state_file = args.state_dir.join("pods.json");
    if let Ok(bytes) = std::fs::read(&state_file) {
        let pods: Vec<mesh_common::cni::PodNetwork> = serde_json::from_slice(&bytes).unwrap_or_default();
        for pod in pods {
            if let Ok(ns) = mesh_agent::netns::NetNs::open(&pod.netns) {
                let _ = ns.run_on_thread(|| {
                    inpod::routing::remove();
                    Ok(())
                });
            }
        }
        std::fs::remove_file(&state_file)?;
    }
    let removed =
        capture::remove_pins(&args.bpffs).with_context(|| format!("removing pins under {}", args.bpffs.display()))?;
    println!("removed {removed} pins under {}; capture is off", args.bpffs.display());
    Ok(())
}
