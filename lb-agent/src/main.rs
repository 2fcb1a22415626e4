//! `lb-agent`: run the node agent, inspect its maps, or remove everything.
//!
//! The binary is this file (arguments, logging, dispatch), [`cli`] (the
//! command line) and [`agent`] (the run loop); everything else is the
//! `lb_agent` library.

mod agent;
mod cli;

use anyhow::{Context as _, Result};
use clap::Parser;
use lb_agent::{
    datapath::{bpffs, maps::Maps, programs},
    inspect,
};
use tracing::{error, info};

use crate::cli::{Cli, Command, LogFormat, TraceProto, TraceSocket};

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(e) = real_main(cli) {
        error!("{e:#}");
        std::process::exit(1);
    }
}

/// Logs to stderr, as text or JSON, filtered by `LB_LOG`.
fn init_logging(format: LogFormat) {
    // kube-client logs every failed request at error level; while the API
    // is away that repeats, at each retry, the watch error the source
    // already logs once per outage.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the command.
fn real_main(mut cli: Cli) -> Result<()> {
    cli.command.resolve_paths()?;
    // Before any thread exists: setns into a mount namespace needs that.
    bpffs::enter_outer_mount_ns()?;
    match cli.command {
        Command::Run(args) => agent::run(&args),
        Command::Check(args) => {
            let report = lb_agent::check::run(&args.run.check_flags());
            let view = cli::View {
                bpffs: args.run.bpffs.clone(),
                output: args.output,
            };
            view.print(&report, lb_agent::check::table)?;
            if report.fails() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Services(view) => {
            let maps = Maps::open(&view.bpffs)?;
            view.print(&inspect::services(&maps)?, |v| inspect::services_table(v))
        }
        Command::Stats(view) => {
            let maps = Maps::open(&view.bpffs)?;
            let stats = inspect::with_socket_counters(inspect::stats(&maps)?, &view.bpffs)?;
            view.print(&stats, inspect::stats_table)
        }
        Command::Backends(view) => {
            let maps = Maps::open(&view.bpffs)?;
            view.print(&inspect::backends(&maps)?, |v| inspect::backends_table(v))
        }
        Command::Conntrack {
            view,
            addr,
            port,
            service,
        } => {
            let maps = Maps::open(&view.bpffs)?;
            let filter = inspect::FlowFilter {
                addr,
                port,
                service,
            };
            view.print(&inspect::conntrack(&maps, &filter)?, |v| {
                inspect::conntrack_table(v)
            })
        }
        Command::Maglev { view, service } => {
            let maps = Maps::open(&view.bpffs)?;
            view.print(&inspect::maglev(&maps, &service)?, |v| {
                inspect::maglev_table(v)
            })
        }
        Command::Trace {
            view,
            proto,
            src,
            dst,
            flags,
            iface,
            socket,
            cookie,
        } => {
            let proto = match proto {
                TraceProto::Tcp => lb_common::proto::TCP,
                TraceProto::Udp => lb_common::proto::UDP,
            };
            if let Some(call) = socket {
                let req = lb_agent::trace::SocketRequest {
                    call: match call {
                        TraceSocket::Connect => lb_agent::trace::SocketCall::Connect,
                        TraceSocket::Sendmsg => lb_agent::trace::SocketCall::Sendmsg,
                    },
                    proto,
                    bound: src.map(|s| s.ip()).filter(|ip| !ip.is_unspecified()),
                    dst,
                    cookie,
                };
                let report = lb_agent::trace::run_socket(&view.bpffs, &req)?;
                return view.print(&report, lb_agent::trace::socket_table);
            }
            let req = lb_agent::trace::Request {
                proto,
                src: src.context("--src is required to trace a packet")?,
                dst,
                tcp_flags: flags,
                iface,
            };
            let report = lb_agent::trace::run(&view.bpffs, &req)?;
            view.print(&report, lb_agent::trace::table)
        }
        Command::Explain {
            view,
            service,
            from,
        } => {
            let state = lb_agent::explain::explain(&view.bpffs, &service, from)?;
            view.print(&state, lb_agent::explain::table)
        }
        Command::Cleanup { bpffs } => {
            programs::cleanup(&bpffs)?;
            let state = lb_agent::explain::state_dir(&bpffs);
            if state.exists() {
                std::fs::remove_dir_all(&state)
                    .with_context(|| format!("remove {}", state.display()))?;
            }
            info!(bpffs = %bpffs.display(), "removed every program link and map pin");
            Ok(())
        }
    }
}
