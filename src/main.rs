//! Entry point: parse arguments and dispatch; everything else lives in the library.

mod cli;

use clap::Parser;
use reqwest::Method;
use serde_json::json;

use cli::{client, Cli, Command};
use opta_lmx::config::Config;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("opta-lmx: cannot start async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opta-lmx: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let mut cfg = Config::load(args.config.as_deref(), std::env::vars())?;
            args.apply(&mut cfg).map_err(anyhow::Error::msg)?;
            opta_lmx::logging::init(&cfg.logging)?;
            opta_lmx::server::run(cfg).await
        }
        Command::Status(c) => client::call(&c, Method::GET, "/admin/status", None).await,
        Command::Models(c) => client::call(&c, Method::GET, "/admin/models", None).await,
        Command::Load {
            model_id,
            context,
            parallel,
            pin,
            ttl_seconds,
            client: c,
        } => {
            let body = json!({"model_id": model_id, "context": context, "parallel": parallel,
                "pin": pin.then_some(true), "ttl_seconds": ttl_seconds});
            client::call(&c, Method::POST, "/admin/model/load", Some(body)).await
        }
        Command::Download {
            model_id,
            pattern,
            revision,
            client: c,
        } => {
            let body = json!({"model_id": model_id, "pattern": pattern, "revision": revision});
            client::download(&c, body).await
        }
        Command::Downloads(c) => {
            client::call(&c, Method::GET, "/admin/model/downloads", None).await
        }
        Command::Delete {
            model_id,
            yes,
            force,
            client: c,
        } => {
            let body = json!({"confirm": yes, "force": force});
            let path = format!("/admin/model/{model_id}");
            client::call(&c, Method::DELETE, &path, Some(body)).await
        }
        Command::Unload {
            model_id,
            client: c,
        } => {
            let body = json!({ "model_id": model_id });
            client::call(&c, Method::POST, "/admin/model/unload", Some(body)).await
        }
    }
}
