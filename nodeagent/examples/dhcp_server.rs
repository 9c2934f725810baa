//! Serves guest DHCP on a bridge from a StratusLab pool definition, for the nested harness
//! and for trying the server by hand: every address of the pool is leased (to "example"),
//! and the server answers those MACs until SIGTERM.
//!
//! usage: dhcp_server <bridge> <server-ip> <pool.json>

use std::process::ExitCode;

use stratus_nodeagent::network::{DhcpServer, DhcpTable, NetworkPool, PoolDefinition};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        eprintln!("usage: dhcp_server <bridge> <server-ip> <pool.json>");
        return ExitCode::from(2);
    }
    let run = || -> Result<(), String> {
        let server_ip = args[1]
            .parse()
            .map_err(|e| format!("server ip '{}': {e}", args[1]))?;
        let json = std::fs::read_to_string(&args[2]).map_err(|e| format!("{}: {e}", args[2]))?;
        let definition = PoolDefinition::from_json(&json).map_err(|e| e.to_string())?;
        let mut pool = NetworkPool::new(definition).map_err(|e| e.to_string())?;
        while pool.allocate("example").is_ok() {}
        let hosts = pool.dhcp_hosts();
        for h in &hosts {
            println!("LEASE {} {}", h.mac, h.ip);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            // The socket registers with the runtime, so it is bound inside it.
            let bound = DhcpServer::new(server_ip, DhcpTable::new(hosts))
                .bind(&args[0])
                .map_err(|e| e.to_string())?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(|e| e.to_string())?;
            bound
                .run(async move {
                    term.recv().await;
                })
                .await;
            Ok(())
        })
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[ERROR] {e}");
            ExitCode::from(1)
        }
    }
}
