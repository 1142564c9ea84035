//! meshctl: checks a node and a cluster for what nodemesh needs, reads agents' admin APIs and summarizes their
//! metrics. Human tables by default, `-o json|yaml` for scripts. Exit codes: 0 fine, 1 a check or request
//! failed, 2 bad usage.

mod admin;
mod check;
mod output;
mod prom;
mod stat;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect and check a nodemesh installation")]
struct Cli {
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: output::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the kernel features of this node, and (with Kubernetes access) the CRDs, controller and agents.
    Check {
        /// Also check agents' readiness directly (admin API address, e.g. 127.0.0.1:15000); repeatable.
        #[arg(long)]
        agent: Vec<String>,
        /// Skip the Kubernetes checks even when a kubeconfig is present.
        #[arg(long)]
        no_kubernetes: bool,
    },
    /// Show an agent's view: its workloads, services, routes, certificates, or the whole config dump.
    ProxyConfig {
        #[arg(value_enum)]
        what: admin::What,
        /// The agent's admin API (`host:port`).
        #[arg(long, default_value = "127.0.0.1:15000")]
        agent: String,
        /// The agent of this node instead, reached through the Kubernetes API (port-forward to the agent pod).
        #[arg(long, conflicts_with = "agent")]
        node: Option<String>,
    },
    /// Per-workload success rate, requests per second and latency percentiles, from agents' metrics.
    Stat {
        /// Only this workload (`namespace/workload`) or namespace (`namespace`).
        target: Option<String>,
        /// Metrics endpoints of the agents (`host:port`); repeatable. Without it: every agent of the cluster
        /// through the Kubernetes API when there is access (KUBECONFIG or in-cluster), else 127.0.0.1:15020.
        #[arg(long)]
        metrics: Vec<String>,
        /// How long to watch: rates and latencies are over this window.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        window: Duration,
    },
}

fn main() -> ExitCode {
    mesh_agent::identity::crypto::install_process_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshctl: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Check { agent, no_kubernetes } => check::run(cli.output, &agent, !no_kubernetes).await,
            Command::ProxyConfig { what, agent, node } => {
                let agent = node.map_or(admin::Agent::Direct(agent), admin::Agent::Node);
                admin::proxy_config(cli.output, what, &agent).await
            }
            Command::Stat { target, metrics, window } => {
                let source = if !metrics.is_empty() {
                    stat::Source::Endpoints(metrics)
                } else {
                    match kube::Client::try_default().await {
                        Ok(client) => stat::Source::Kubernetes(client),
                        Err(_) => stat::Source::Endpoints(vec!["127.0.0.1:15020".into()]),
                    }
                };
                stat::run(cli.output, target.as_deref(), &source, window).await
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::from(1)
        }
    }
}
