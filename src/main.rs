//! Entry point: parse arguments and dispatch; everything else lives in the library.

mod cli;

use clap::Parser;
use reqwest::Method;
use serde_json::json;

use cli::{client, Cli, Command, ListArgs};
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
            let read = move || -> Result<Config, String> {
                let mut cfg = Config::load(args.config.as_deref(), std::env::vars())
                    .map_err(|e| e.to_string())?;
                args.clone().apply(&mut cfg)?;
                Ok(cfg)
            };
            let cfg = read().map_err(anyhow::Error::msg)?;
            opta_lmx::logging::init(&cfg.logging)?;
            opta_lmx::server::run(cfg, Some(std::sync::Arc::new(read))).await
        }
        Command::Status(a) => list(&a, "/admin/status", |v| Ok(cli::tables::status(v))).await,
        Command::Models(a) => list(&a, "/admin/models", |v| Ok(cli::tables::models(v))).await,
        Command::Chat(a) => cli::chat::run(a).await,
        Command::Service { action } => cli::service::dispatch(action),
        Command::ProbeWorker { input } => {
            opta_lmx::engine::llama::run_probe_worker(&input).map_err(anyhow::Error::msg)
        }
        Command::QuantizeWorker {
            input,
            output,
            ftype,
            threads,
        } => opta_lmx::engine::llama::quantize::run_worker(&input, &output, ftype, threads)
            .map_err(anyhow::Error::msg),
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
        Command::Downloads(a) => {
            list(&a, "/admin/model/downloads", |v| {
                let jobs = v
                    .as_array()
                    .or_else(|| v["data"].as_array())
                    .cloned()
                    .unwrap_or_default();
                Ok(cli::tables::downloads_table(&jobs))
            })
            .await
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

/// A listing: the JSON with `--json`, else the table `table` makes of it.
async fn list(
    args: &ListArgs,
    path: &str,
    table: impl FnOnce(&serde_json::Value) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let v = client::request(&args.client, Method::GET, path, None).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", table(&v)?);
    }
    Ok(())
}
